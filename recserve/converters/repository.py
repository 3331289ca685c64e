"""Write models into a Triton model repository: a new version directory each time, never an overwrite."""

from __future__ import annotations

import re
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from recserve.converters.triton_config import from_pbtxt, to_pbtxt
from recserve.errors import ConfigError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _signature(cfg: mc.ModelConfig) -> tuple:
    return (cfg.max_batch_size, tuple((t.name, t.data_type, tuple(t.dims)) for t in cfg.input),
            tuple((t.name, t.data_type, tuple(t.dims)) for t in cfg.output))


def _runtime(cfg: mc.ModelConfig) -> str:
    """What Triton runs every version of the model with: its platform or backend (one per model)."""
    return cfg.platform or cfg.backend


def check_fits(repository: Path, config: mc.ModelConfig) -> None:
    """Raise ConfigError unless a version with ``config`` can join the model's served versions (if any): the
    same platform, inputs, outputs and max_batch_size. Cheap: ``build`` asks before compiling an engine."""
    model_dir = Path(repository) / config.name
    cfg_path = model_dir / "config.pbtxt"
    if not cfg_path.exists():
        return
    existing = versions(model_dir)
    old = from_pbtxt(cfg_path.read_text())
    if _runtime(old) != _runtime(config):
        raise ConfigError(f"{config.name}: its versions {existing} run on {_runtime(old)} and Triton serves every "
                          f"version of a model with one platform, so a {_runtime(config)} version cannot join "
                          f"them; build it under another --name (e.g. {config.name}_trt) and roll out to that model")
    if _signature(old) != _signature(config):
        raise ConfigError(f"{config.name}: the new model's inputs/outputs/max_batch_size differ from the served "
                          f"versions {existing}; build it under another --name")


def add_version(repository: Path, config: mc.ModelConfig, files: dict[str, bytes], version: int | None = None) -> Path:
    """Write ``files`` into ``repository/<name>/<version>/`` and the model's ``config.pbtxt``.

    The version is the next free one unless given; an existing version is never touched. The new
    config must keep the inputs and outputs of the existing one and its platform (every version is
    served with the one config: a TensorRT version in an ONNX model would stop the ONNX ones loading).
    """
    if not NAME.match(config.name):
        raise ConfigError(f"model name {config.name!r}: use letters, digits, '_', '-' and '.'")
    repository = Path(repository)
    blocked = next((p for p in [repository, *repository.parents] if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise ConfigError(f"--repository {repository}: {blocked} is a file, not a directory; give a model repository "
                          "directory (it is created if missing)")
    model_dir = repository / config.name
    existing = versions(model_dir)
    version = version if version is not None else (existing[-1] + 1 if existing else 1)
    if version < 1:
        raise ConfigError("--version must be 1 or more")
    if version in existing:
        raise ConfigError(f"{model_dir}/{version} already exists; versions are never overwritten: "
                          "omit --version to add the next one")
    check_fits(repository, config)
    cfg_path = model_dir / "config.pbtxt"
    vdir = model_dir / str(version)
    vdir.mkdir(parents=True)
    for name, data in files.items():
        (vdir / name).write_bytes(data)
    cfg_path.write_text(to_pbtxt(config))
    return vdir
