"""``recserve build``: a compressed (or trained) ONNX model into a new version of a Triton model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from recserve.converters.pipeline import load_model
from recserve.converters.repository import add_version, check_fits
from recserve.converters.storage import densify
from recserve.converters.tensorrt import build_engine
from recserve.converters.triton_config import TARGETS, BuildProfile, graph_io, model_config, to_pbtxt
from recserve.converters.trt_check import Finding, check
from recserve.errors import ConfigError, ModelError
from recserve.provenance import MANIFEST, manifest
from recserve.specs import read_mapping, read_text, validate


@dataclass
class BuildResult:
    version_dir: Path
    config_text: str
    findings: list[Finding] = field(default_factory=list)


def load_profile(path: Path | None, overrides: dict) -> BuildProfile:
    """A YAML profile with flag overrides on top (flags given as None are left out)."""
    raw: dict = {}
    if path is not None:
        raw = read_mapping(read_text(path, "profile"), str(path), "a build profile is a YAML mapping of options")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return validate(BuildProfile, raw, "build profile")


def build(model_path: Path, name: str, target: str, repository: Path, profile: BuildProfile,
          version: int | None = None) -> BuildResult:
    if target not in TARGETS:
        raise ConfigError(f"unknown --target {target!r}; use one of {', '.join(TARGETS)}")
    loaded = load_model(model_path)
    # TensorRT reads no sparse initializers (pruned weights stored sparse): build from dense ones
    graph = densify(loaded.graph) if target != "onnxruntime" else loaded.graph
    config = model_config(name, graph, target, profile)
    check_fits(repository, config)  # the model it joins first: before any engine is built
    findings = check(graph, profile.max_batch_size) if target != "onnxruntime" else []
    errors = [f for f in findings if f.severity == "error"]
    if target == "tensorrt" and errors:
        raise ModelError("the model is not ready for TensorRT:\n  " + "\n  ".join(map(str, errors)))
    if target == "tensorrt":
        inputs, _ = graph_io(graph)
        files = {"model.plan": build_engine(graph.SerializeToString(), inputs, profile)}
    else:
        files = {"model.onnx": graph.SerializeToString()}
    if loaded.preprocessing is not None and loaded.preprocessing.exists():
        files["preprocessing.json"] = loaded.preprocessing.read_bytes()
    files[MANIFEST] = manifest(loaded.source)  # the file it came from: a compression report names the same
    vdir = add_version(repository, config, files, version)
    return BuildResult(vdir, to_pbtxt(config), findings)
