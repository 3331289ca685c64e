"""Training on Ray Train (issue 20): rows/s of ``recserve train --workers N`` for 1 and 2 workers on the same data
and epochs, and the peak resident memory of each Ray Train worker process (sampled from /proc every 0.2 s).
On this 2-core machine two workers share the cores with Ray's own processes; on a bigger node (or one worker
per node) the rows/s grow with the workers until the gradient all-reduce (gloo over TCP on CPU) dominates.

Streamed: what one row costs the in-memory Criteo reader (its peak RSS over an import-only baseline, on
``PROBE_ROWS`` rows), hence how many rows it holds in 2 GiB; then ``BENCH_STREAM_ROWS`` Criteo-format rows
(``recserve write-shards``) trained for one epoch with 2 workers from the shards, with the peak RSS of every
Ray process by its role (train worker, shard reader, ...) and of the driver. The same for an interaction log
(``recserve write-shards --kind interactions``, ``BENCH_LOG_ROWS`` interactions, each a positive and 4 negatives):
what one interaction costs the in-memory reader (the ranking view and the retriever's), then the log streamed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = "synthetic:200000"
EPOCHS = 2
PROBE_ROWS = 200_000
STREAM_ROWS = int(os.environ.get("BENCH_STREAM_ROWS", "2000000"))
LOG_ROWS = int(os.environ.get("BENCH_LOG_ROWS", "500000"))
STREAM_SPEC_OPTIONS = ",min_freq=20"
"""Tokens seen fewer than 20 times are out of vocabulary (bounds the embedding tables, as on real Criteo)."""
KINDS = ("criteo", "interactions")
CLI = [sys.executable, "-c", "from recserve.cli import main; main()"]


def _memory(pid: int | str) -> tuple[int, int]:
    """(resident bytes, private resident bytes) of a process now, from /proc (OSError once it is gone). The
    private part (RssAnon) leaves out pages shared with other processes: the libraries and Ray's object store."""
    status = {ln.split(":")[0]: int(ln.split()[1]) for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
              if ln.startswith(("VmRSS", "RssAnon"))}
    return status.get("VmRSS", 0) * 1024, status.get("RssAnon", 0) * 1024


def _worker_rss() -> dict[int, int]:
    """Resident bytes of each Ray Train worker process now."""
    return {pid: rss for pid, (role, rss, _) in _ray_rss().items() if role == "RayTrainWorker"}


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


def _ray_rss() -> dict[int, tuple[str, int, int]]:
    """(role, resident bytes, private resident bytes) of every Ray worker process now (its title:
    ``ray::RayTrainWorker``, ...; see :func:`_memory`)."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if not cmd.startswith("ray::"):
                continue
            rss, anon = _memory(proc.name)
        except (OSError, IndexError, ValueError):
            continue
        out[int(proc.name)] = (cmd[5:].split("(")[0].split(".")[0].strip() or "worker", rss, anon)
    return out


def _shards(workdir: Path, rows: int, kind: str = "criteo") -> str:
    """The spec of ``rows`` rows of ``kind`` written as shards (once per work directory)."""
    out = workdir / f"{kind}-shards-{rows}"
    if not (out / ".complete").exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
        subprocess.run([*CLI, "write-shards", "--kind", kind, "--rows", str(rows), "--out", str(out)], check=True,
                       cwd=ROOT, capture_output=True)
        (out / ".complete").write_text("")
    if kind == "criteo":
        return f"criteo:{out}{STREAM_SPEC_OPTIONS}"
    return f"interactions:{out / 'log'},meta={out / 'item_meta.csv'}"


def _shard_mib(spec: str) -> float:
    from recserve.data import criteo, logs
    from recserve.data.spec import parse_spec

    s = parse_spec(spec)
    paths = criteo.shard_paths(s.path) if s.kind == "criteo" else logs.log_paths(s.path)
    return sum(p.stat().st_size for p in paths) / 2**20


def in_memory_cost(workdir: Path, kind: str = "criteo") -> dict:
    """Peak RSS of the in-memory reader on PROBE_ROWS rows over a baseline that imports the same modules."""
    spec = _shards(workdir, PROBE_ROWS, kind)
    probe = ("import resource, sys; from recserve.data import load_dataset; import pyarrow.csv, pyarrow.compute; "
             "{}; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    peak = [int(subprocess.run([sys.executable, "-c", probe.format(work)], check=True, capture_output=True, text=True,
                               cwd=ROOT).stdout.split()[-1]) * 1024
            for work in ("pass", f"load_dataset({spec!r})")]
    per_row = (peak[1] - peak[0]) / PROBE_ROWS
    return {"kind": kind, "probe_rows": PROBE_ROWS, "bytes_per_row": per_row, "rows_in_2gib": int(2 * 2**30 / per_row),
            "baseline_rss_mib": peak[0] / 2**20}


def streamed(workdir: Path, rows: int, rows_in_2gib: int, kind: str = "criteo") -> dict:
    spec = _shards(workdir, rows, kind)
    out = workdir / f"train-streamed-{kind}"
    peak: dict[str, int] = {}
    private: dict[str, int] = {}
    done = threading.Event()
    driver_peak = [0]

    def sample(pid: int) -> None:
        while not done.is_set():
            for role, rss, anon in _ray_rss().values():
                peak[role] = max(peak.get(role, 0), rss)
                private[role] = max(private.get(role, 0), anon)
            try:
                driver_peak[0] = max(driver_peak[0], _memory(pid)[0])
            except OSError:
                pass
            time.sleep(0.2)

    t0 = time.perf_counter()
    proc = subprocess.Popen([*CLI, "train", "--data", spec, "--out", str(out),
                             "--epochs", "1", "--workers", "2", "--batch-size", "4096", "--force"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    sampler = threading.Thread(target=sample, args=(proc.pid,), daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate(timeout=7200)
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(stderr[-2000:])
    meta = json.loads((out / "model.json").read_text())["metrics"]
    return {"kind": kind, "rows": rows, "x_in_memory_2gib": rows / rows_in_2gib, "wall_s": time.perf_counter() - t0,
            "shard_mib": _shard_mib(spec),
            "rows_per_s": meta["history"]["rows_per_s"], "held_out_auc": meta["held_out"]["auc"],
            "rows_by_split": meta["history"]["rows"], "driver_peak_rss_mib": driver_peak[0] / 2**20,
            "peak_rss_mib_by_role": {k: v / 2**20 for k, v in sorted(peak.items())},
            "peak_private_rss_mib_by_role": {k: v / 2**20 for k, v in sorted(private.items())}}


def run(workdir: Path) -> dict:
    runs = [one(workdir, w) for w in (1, 2)]
    cost = in_memory_cost(workdir)
    log_cost = in_memory_cost(workdir, "interactions")
    return {"data": DATA, "epochs": EPOCHS, "runs": runs, "speedup": runs[1]["rows_per_s"] / runs[0]["rows_per_s"],
            "in_memory": cost, "streamed": streamed(workdir, STREAM_ROWS, cost["rows_in_2gib"]),
            "log_in_memory": log_cost,
            "log_streamed": streamed(workdir, LOG_ROWS, log_cost["rows_in_2gib"], "interactions")}


def markdown(r: dict) -> str:
    lines = ["### Training on Ray Train", "", f"`recserve train --workers N` on {r['data']}, {r['epochs']} epochs "
             "(rows/s over the epochs' training time, all workers; peak RSS of one worker process):", "",
             "| workers | rows/s | held-out AUC | peak RSS per worker (MiB) | wall (s) |", "|---:|---:|---:|---:|---:|"]
    for x in r["runs"]:
        lines.append(f"| {x['workers']} | {x['rows_per_s']:,.0f} | {x['held_out_auc']:.4f} | "
                     f"{x['peak_rss_per_worker_mib']:,.0f} | {x['wall_s']:.0f} |")
    lines += ["", f"2 workers / 1: {r['speedup']:.2f}x rows/s (both on the same 2 cores)."]
    for cost_key, run_key, what in (("in_memory", "streamed", "the Criteo reader costs {} bytes per row"),
                                     ("log_in_memory", "log_streamed", "the interaction-log reader costs {} bytes per "
                                      "interaction (5 ranking rows and the retriever's pairs)")):
        if run_key not in r:
            continue
        m, st = r[cost_key], r[run_key]
        cost = what.format(format(m["bytes_per_row"], ",.0f"))
        lines += ["", f"In memory, {cost} (peak RSS over its imports, "
                  f"{m['probe_rows']:,} rows): {m['rows_in_2gib']:,} rows in 2 GiB. Streamed from "
                  f"{st['rows']:,} rows of shards ({st['shard_mib']:,.0f} MiB, {st['x_in_memory_2gib']:.1f}x that), "
                  f"1 epoch, 2 workers: {st['rows_per_s']:,.0f} rows/s, held-out AUC {st['held_out_auc']:.4f}, "
                  f"{st['wall_s']:.0f} s; driver peak RSS {st['driver_peak_rss_mib']:,.0f} MiB.", "",
                  "| Ray process | peak RSS (MiB) | of it private (MiB) |", "|---|---:|---:|"]
        lines += [f"| {role} | {mib:,.0f} | {st.get('peak_private_rss_mib_by_role', {}).get(role, float('nan')):,.0f} |"
                  for role, mib in st["peak_rss_mib_by_role"].items()]
    return "\n".join(lines)
