"""Which models of a repository can be served: each needs a version with its model file, and every
model it uses (ensemble steps, models named by ``*_model`` parameters) servable too.

Triton started on a repository with one unservable model (the checked-in ``retrieve`` ensemble
before ``recserve index`` built its ``user_tower``) refuses to start at all, with the cause deep in
its log. The plan lets ``recserve serve`` and ``route`` load what was built and say, one line per
model, what is left out and what to build to get it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from recserve.converters.triton_config import from_pbtxt
from recserve.errors import ConfigError

MODEL_FILES = ("model.onnx", "model.plan", "model.py", "model.savedmodel", "model.pt")
HOW_TO_BUILD = {
    "ranker": "recserve build MODEL --name ranker",
    "user_tower": "recserve index RETRIEVER --ranker RANKER",
    "item_index": "recserve index RETRIEVER --ranker RANKER",
}


@dataclass
class RepositoryPlan:
    servable: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    """Model name -> why it is left out (and what to build)."""
    broken: dict[str, str] = field(default_factory=dict)
    """Model name -> why its config.pbtxt cannot be read: a mistake to fix, not something to leave out."""


def read_configs(repository: Path) -> tuple[dict[str, mc.ModelConfig | None], dict[str, str]]:
    """Every model directory's config (None without one), and the configs that do not parse, with why."""
    out: dict[str, mc.ModelConfig | None] = {}
    broken: dict[str, str] = {}
    for d in sorted(p for p in Path(repository).iterdir() if p.is_dir() and not p.name.startswith(".")):
        cfg = d / "config.pbtxt"
        try:
            out[d.name] = from_pbtxt(cfg.read_text()) if cfg.exists() else None
        except (ConfigError, text_format.ParseError, ValueError, UnicodeDecodeError) as e:
            broken[d.name] = f"{cfg} does not parse ({str(e).splitlines()[0][:200]})"
    return out, broken


def has_version(model_dir: Path, config: mc.ModelConfig) -> bool:
    """A numbered version directory holding a model file (ensembles need only the directory)."""
    for v in (p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()):
        if config.platform == "ensemble" or any((v / f).exists() for f in MODEL_FILES):
            return True
    return False


def uses(config: mc.ModelConfig) -> list[str]:
    steps = [s.model_name for s in config.ensemble_scheduling.step]
    named = [config.parameters[k].string_value for k in sorted(config.parameters)
             if k.endswith("_model") and config.parameters[k].string_value]
    return list(dict.fromkeys(steps + named))


def plan(repository: Path) -> RepositoryPlan:
    """What to load, and what to leave out with the reason (pure, given the directory's contents)."""
    repository = Path(repository)
    configs, broken = read_configs(repository)
    reasons: dict[str, str] = {}
    for name, cfg in configs.items():
        if cfg is None:
            reasons[name] = "no readable config.pbtxt"
        elif not has_version(repository / name, cfg):
            reasons[name] = f"no version with a model file; build it ({HOW_TO_BUILD.get(name, 'recserve build')})"
    changed = True
    while changed:  # a model using an unservable one is unservable too
        changed = False
        for name, cfg in configs.items():
            if name in reasons or cfg is None:
                continue
            for dep in uses(cfg):
                if dep not in configs:
                    how = HOW_TO_BUILD.get(dep, f"recserve build MODEL --name {dep}")
                    reasons[name] = f"needs {dep}, which is not built ({how})"
                elif dep in reasons:
                    reasons[name] = reasons[dep] if reasons[dep].startswith("needs ") else f"needs {dep}: {reasons[dep]}"
                else:
                    continue
                changed = True
                break
    return RepositoryPlan([n for n in configs if n not in reasons], {n: reasons[n] for n in configs if n in reasons},
                          broken)
