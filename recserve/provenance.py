"""Which file a model version was built from: the link between a compression report and a Triton version.

``recserve compress`` names the sha256 of the model.onnx it writes in its report (``model_sha256``);
``recserve build`` writes :data:`MANIFEST` into the version directory it adds, naming the sha256 of the file it
built from (an engine or a re-serialised graph differs from it byte for byte, so the source is what is named).
The operator compares the two before a canary starts (a report attached to the wrong candidate is refused).
Standard library only: the operator imports it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "recserve.json"
"""In ``<repository>/<model>/<version>/``, beside the model file (Triton ignores it)."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest(source: Path) -> bytes:
    """The manifest of a version built from ``source``."""
    return json.dumps({"source": str(source), "source_sha256": file_sha256(source)}, indent=2).encode() + b"\n"


def source_sha256(version_dir: Path) -> str:
    """The sha256 the version's manifest names; ``""`` when the version has no manifest (not built by
    ``recserve build``, or before it wrote one). OSError when it cannot be read; ValueError when it is not one."""
    try:
        raw = (Path(version_dir) / MANIFEST).read_text()
    except FileNotFoundError:
        return ""
    try:
        value = json.loads(raw)["source_sha256"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{Path(version_dir) / MANIFEST} is not a recserve manifest: {e}") from e
    if not isinstance(value, str) or len(value) != 64:
        raise ValueError(f"{Path(version_dir) / MANIFEST}: source_sha256 is not a sha256")
    return value
