"""Training on Ray Train (issue 20): rows/s of ``recserve train --workers N`` for 1 and 2 workers on the same data
and epochs, and the peak resident memory of each Ray Train worker process (sampled from /proc every 0.2 s).
On this 2-core machine two workers share the cores with Ray's own processes; on a bigger node (or one worker
per node) the rows/s grow with the workers until the gradient all-reduce (gloo over TCP on CPU) dominates.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = "synthetic:200000"
EPOCHS = 2


def _worker_rss() -> dict[int, int]:
    """Resident bytes of each Ray Train worker process now."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if b"RayTrainWorker" not in (proc / "cmdline").read_bytes():
                continue
            rss = next(int(ln.split()[1]) for ln in (proc / "status").read_text().splitlines() if ln.startswith("VmRSS"))
        except (OSError, StopIteration, ValueError):
            continue
        out[int(proc.name)] = rss * 1024
    return out


def one(workdir: Path, workers: int) -> dict:
    out = workdir / f"train-w{workers}"
    peak: dict[int, int] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for pid, rss in _worker_rss().items():
                peak[pid] = max(peak.get(pid, 0), rss)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "from recserve.cli import main; main()", "train", "--data", DATA,
                           "--out", str(out), "--epochs", str(EPOCHS), "--workers", str(workers), "--force"],
                          capture_output=True, text=True, cwd=ROOT, timeout=3600)
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    history = json.loads((out / "model.json").read_text())["metrics"]
    return {"workers": workers, "rows_per_s": history["history"]["rows_per_s"], "wall_s": time.perf_counter() - t0,
            "held_out_auc": history["held_out"]["auc"], "peak_rss_per_worker_mib": max(peak.values(), default=0) / 2**20}


def run(workdir: Path) -> dict:
    runs = [one(workdir, w) for w in (1, 2)]
    return {"data": DATA, "epochs": EPOCHS, "runs": runs, "speedup": runs[1]["rows_per_s"] / runs[0]["rows_per_s"]}


def markdown(r: dict) -> str:
    lines = ["### Training on Ray Train", "", f"`recserve train --workers N` on {r['data']}, {r['epochs']} epochs "
             "(rows/s over the epochs' training time, all workers; peak RSS of one worker process):", "",
             "| workers | rows/s | held-out AUC | peak RSS per worker (MiB) | wall (s) |", "|---:|---:|---:|---:|---:|"]
    for x in r["runs"]:
        lines.append(f"| {x['workers']} | {x['rows_per_s']:,.0f} | {x['held_out_auc']:.4f} | "
                     f"{x['peak_rss_per_worker_mib']:,.0f} | {x['wall_s']:.0f} |")
    lines += ["", f"2 workers / 1: {r['speedup']:.2f}x rows/s (both on the same 2 cores)."]
    return "\n".join(lines)
