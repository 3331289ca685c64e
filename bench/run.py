"""`make bench`: run every benchmark, write bench/results.json and bench/results.md.

``python -m bench.run [NAME ...]`` runs some of them. Later benchmarks reuse what earlier ones built
in one work directory: a temporary one, or ``$BENCH_WORKDIR`` when set (kept, so that
``BENCH_WORKDIR=/tmp/bw python -m bench.run compression`` once lets ``... bench.run router`` rerun alone).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.markdown import Markdown

from bench import compression, encoder, loadtest, router, search, train, triton

HERE = Path(__file__).resolve().parent
BENCHMARKS = {"compression": compression, "triton": triton, "router": router,
              "loadtest": loadtest, "encoder": encoder, "search": search, "train": train}
"""In order: later benchmarks reuse what earlier ones built in the shared work directory."""


def main(only: list[str] | None = None) -> int:
    console = Console()
    results = {"machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine(),
                           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
    sections = ["# recserve benchmarks", ""]
    keep = os.environ.get("BENCH_WORKDIR")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(keep) if keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name, module in BENCHMARKS.items():
            if only and name not in only:
                continue
            with console.status(f"benchmark: {name}"):
                t0 = time.perf_counter()
                results[name] = module.run(workdir)
                results[name]["seconds"] = round(time.perf_counter() - t0, 1)
            sections += [module.markdown(results[name]), ""]
    (HERE / "results.json").write_text(json.dumps(results, indent=2))
    (HERE / "results.md").write_text("\n".join(sections))
    console.print(Markdown("\n".join(sections)))
    console.print(f"written: {HERE / 'results.json'}, {HERE / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or None))
