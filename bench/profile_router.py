"""Where a router replica's CPU goes: py-spy samples one replica while a closed loop at concurrency 16 ranks 50
candidates through it (issue 15: profile before cutting the per-request cost).

    .venv/bin/python -m bench.profile_router [OUT_DIR]     # about 2 minutes here; py-spy is in the dev extra

Trains a small ranker on the synthetic generator, builds it into a repository for the embedded Triton, starts
the router app (``ingress: replica``, one replica, cache off) as ``bench/router.py`` does, and records the
replica for 20 s at 200 samples/s (``py-spy record --nonblocking -f raw``: the replica is not paused). Writes
``OUT_DIR/profile.txt`` (raw stacks, for flamegraph.pl or speedscope) and prints the functions with the
largest share of the samples, inclusive and self, with the calls/s and the replica's CPU per call measured
in the same run (both vary with how busy the machine is: compare shares, not milliseconds, across runs).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

SPEC = "synthetic:20000,users=300,items=500"
SECONDS, RATE_HZ, CONCURRENCY, CALLS = 20, 200, 16, 2000


def frame_name(frame: str) -> str:
    """``func (path/file.py:12)`` -> ``func file.py``: one name per function, whatever the line."""
    func, _, where = frame.partition(" (")
    return f"{func} {where.split(':')[0].rsplit('/', 1)[-1]}".strip()


def shares(raw: str) -> tuple[int, Counter, Counter]:
    """(samples, inclusive samples per function, self samples per function) of py-spy's raw output."""
    total, inclusive, own = 0, Counter(), Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n, frames = int(count), [frame_name(f) for f in stack.split(";")]
        total += n
        for name in set(frames):
            inclusive[name] += n
        own[frames[-1]] += n
    return total, inclusive, own


def main(out: Path) -> int:
    from bench import router as br
    from recserve.models.pipeline import train_model
    from recserve.serving import app
    from recserve.triton.client import TritonClient

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="recserve-profile-") as tmp:
        work = Path(tmp)
        train_model(SPEC, "ranker", work / "ranker", epochs=1, embedding_dim=16, threads=2, seed=0)
        triton, cfg, ranks, _ = br.serve_ranker(work / "ranker", SPEC, work, replicas=1, ingress="replica")
        app.start(cfg)
        try:
            target, message = cfg.grpc_targets(), ranks[0].SerializeToString()
            with TritonClient(triton.grpc_url) as client:
                def load() -> tuple[list, float]:
                    return br._closed(client, CONCURRENCY, CALLS)(target, br.RANK, message, br.DEADLINE)

                br._closed(client, 4, 300)(target, br.RANK, message, br.DEADLINE)  # warm-up
                pid = _replica_pid()
                record = subprocess.Popen([spy, "record", "-p", str(pid), "-d", str(SECONDS), "-r", str(RATE_HZ),
                                           "-f", "raw", "-o", str(out / "profile.txt"), "--nonblocking"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                rates, t0 = [], time.monotonic()
                while time.monotonic() - t0 < SECONDS - 2:
                    rates.append(load()[1])
                record.wait()
                cpu_ms = br.cpu_per_call(cfg, lambda: (load(), CALLS)[1])
        finally:
            triton.stop()
            app.stop()
    total, inclusive, own = shares((out / "profile.txt").read_text())
    print(f"{sum(rates) / len(rates):.0f} calls/s at concurrency {CONCURRENCY}; replica CPU {cpu_ms:.2f} ms per call; "
          f"{total} samples")
    for title, counts in (("inclusive", inclusive), ("self", own)):
        print(f"--- {title}")
        for name, n in counts.most_common(25):
            print(f"{n / total:6.1%}  {name}")
    return 0


def _replica_pid() -> int:
    """The router replica's process (Ray names it after the actor)."""
    found = subprocess.run(["pgrep", "-f", "ServeReplica:.*Router"], capture_output=True, text=True).stdout.split()
    if not found:
        raise SystemExit("error: no router replica process found")
    return int(found[0])


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench") / "profile"))
