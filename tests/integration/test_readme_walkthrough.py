"""The README's walkthrough, run as written: its shell blocks, in order, in a fresh directory, on synthetic data.

If a command, an option or an output the walkthrough relies on changes, this test fails until the README
says the new thing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recserve.triton.server import port_free, port_listening

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Walkthrough: from data to a Rank call"
PORTS = (8100, 8101, 8102, 9000, 8010)


def walkthrough() -> str:
    text = (ROOT / "README.md").read_text()
    assert SECTION in text, "the README lost its walkthrough"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return "\n".join(re.findall(r"```bash\n(.*?)```", section, re.S))


def test_the_walkthrough_covers_the_first_hour() -> None:
    script = walkthrough()
    for command in ("recserve train", "recserve compress", "recserve build", "recserve serve", "recserve infer",
                    "recserve catalog", "recserve route", "recserve rank --", "recserve rank --http",
                    "recserve loadtest"):
        assert command in script, command


def test_the_walkthrough_runs_verbatim(tmp_path: Path) -> None:
    deadline = time.monotonic() + 60  # a router stopped by an earlier test may still be letting go of its ports
    while (busy := [p for p in PORTS if not port_free(p)]) and time.monotonic() < deadline:
        time.sleep(1)
    if busy:
        pytest.skip(f"ports {busy} are taken on this machine; the walkthrough uses the documented defaults")
    env = {**os.environ, "DATA": "synthetic:100000", "COLUMNS": "80",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    # background servers go with the script, whatever happens
    script = "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + walkthrough()
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{out[-4000:]}\n--- stderr\n{err[-4000:]}"
    assert "trained ranker on synthetic:100000" in out
    assert "gate passed: runs/ranker-small/model.onnx is" in out
    assert "built runs/repo/ranker/1 (onnxruntime)" in out and "Triton ready: gRPC 127.0.0.1:8101" in out
    assert re.search(r"score \[2, 1\]: \[\[0\.\d+\], \[0\.\d+\]\]", out), out
    answers = [line for line in out.splitlines() if line.startswith("served_by ")]
    assert len(answers) == 2 and all("model ranker version 1" in a for a in answers), answers
    ranked = [line for line in out.splitlines() if re.match(r"\s+\d\. \S+\s+0\.\d+$", line)]
    assert len(ranked) == 5  # top 3 over gRPC, top 2 over HTTP
    table = out.split("walkthrough: router", 1)[1]
    assert "yes" in table and "NO" not in table
    assert "Traceback" not in err
    deadline = time.monotonic() + 30  # Ray's replica processes leave a moment after the router exits
    while (busy := [p for p in PORTS if port_listening(p)]) and time.monotonic() < deadline:
        time.sleep(1)
    assert not busy, f"servers still listen on {busy} 30 s after the walkthrough stopped them"
