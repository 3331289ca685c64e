"""Compression benchmark (issue 13's bar): one command, no per-dataset tuning, five datasets.

For each dataset: ``recserve train`` the reference DCN-v2 ranker (the teacher), then the same
budgeted search every user would run::

    recserve compress TEACHER --data SPEC --out DIR --max-auc-loss 0.001 --min-size-ratio 8 --min-throughput-ratio 2.5

and, for comparison, the fixed ``recipes/ranker-8x.yaml``. The datasets: MovieLens-100k, the
Amazon grocery log as a ranker (4 sampled negatives per positive, split by time), and
``synthetic:100000`` at three seeds (``../shared/datasets`` absent: the synthetic ones only). Every
number is on the test split, scored once after the search chose on validation. Throughput is the
paired ratio of the compressed model to the FP32 ONNX teacher at batch 256 with 2 threads,
interleaved in one run; PyTorch eager is timed beside them on MovieLens.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.timing import interleaved, paired_ratio, percentiles
from recserve.converters.pipeline import compress
from recserve.converters.recipe import Gate, Recipe, SearchSpec, load_recipe
from recserve.data import load_dataset
from recserve.models.artifact import load_trained
from recserve.models.pipeline import train_model
from recserve.onnxrt import session

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "datasets"
MOVIELENS = SHARED / "movielens_100k"
GROCERY = SHARED / "ecommerce_amazon_grocery"
SERVED = "compressed-movielens"
"""The MovieLens search result, which the Triton, router and load-test benchmarks serve."""
BUDGET = dict(max_relative_auc_loss=0.001, min_size_ratio=8, min_throughput_ratio=2.5)
THREADS = 2
BATCH = 256


def datasets() -> dict[str, str]:
    out = {}
    if (MOVIELENS / "u.data").exists():
        out["movielens"] = f"movielens:{MOVIELENS}"
    if (GROCERY / "train.csv").exists():
        out["grocery"] = f"interactions:{GROCERY}/train.csv,meta={GROCERY}/item_meta.csv"
    for seed in (1, 2, 3):
        out[f"synthetic-{seed}"] = f"synthetic:100000,seed={seed}"
    return out


def search_recipe() -> Recipe:
    """What ``--max-auc-loss 0.001 --min-size-ratio 8 --min-throughput-ratio 2.5`` builds."""
    return Recipe(name="search", search=SearchSpec(), gate=Gate(**BUDGET))


def summary(report) -> dict:
    chosen = report.search.chosen if report.search else None
    return {
        "gate_passed": report.gate.passed, "reasons": report.gate.reasons,
        "relative_auc_loss": report.relative_auc_loss, "relative_auc_loss_se": report.relative_auc_loss_se,
        "validation_relative_auc_loss": report.validation.relative_auc_loss,
        "size_ratio": report.size_ratio, "throughput_ratio": report.throughput_ratio,
        "distinct_score_ratio": report.distinct_score_ratio,
        "auc": report.result.auc, "baseline_auc": report.baseline.auc,
        "bytes": report.result.size_bytes, "baseline_bytes": report.baseline.size_bytes,
        "stages": [s.name for s in report.stages], "chosen": chosen,
        "candidates": len(report.search.candidates) if report.search else None,
        "search_seconds": report.search.seconds if report.search else None,
        "stopped": report.search.stopped if report.search else None,
    }


def run(workdir: Path) -> dict:
    results = {}
    for name, spec in datasets().items():
        teacher = workdir / f"teacher-{name}"
        t0 = time.perf_counter()
        trained = train_model(spec, "ranker", teacher, epochs=6, force=True)
        train_s = time.perf_counter() - t0
        out = workdir / (SERVED if name == "movielens" else f"search-{name}")
        t0 = time.perf_counter()
        report = compress(teacher, search_recipe(), out, data_spec=spec, force=True)
        search_s = time.perf_counter() - t0
        fixed = compress(teacher, load_recipe(ROOT / "recipes" / "ranker-8x.yaml"), workdir / f"ranker-8x-{name}",
                         data_spec=spec, force=True)
        results[name] = {"data": spec, "teacher": trained, "train_seconds": round(train_s, 1),
                         "search": summary(report), "command_seconds": round(search_s, 1),
                         "ranker_8x": summary(fixed)}
    first = next(iter(results))
    speed = measure(workdir / f"teacher-{first}", workdir / (SERVED if first == "movielens" else f"search-{first}")
                    / "model.onnx", results[first]["data"])
    if first != "movielens":  # no MovieLens here: serve the first dataset's result downstream
        import shutil

        shutil.copytree(workdir / f"search-{first}", workdir / SERVED, dirs_exist_ok=True)
    return {"budget": BUDGET, "datasets": results, "speed": {"data": first, **speed},
            "bar_met": all(r["search"]["gate_passed"] for r in results.values())}


def measure(teacher_dir: Path, compressed: Path, spec: str) -> dict:
    """The compressed model against the FP32 ONNX teacher and PyTorch eager, interleaved in one run."""
    data = load_dataset(spec, preprocessing=teacher_dir / "preprocessing.json")
    test = data.ranking_test
    idx = np.arange(BATCH) % len(test)
    feed = {"sparse": test.sparse[idx], "dense": test.dense[idx]}
    one = {"sparse": test.sparse[:1], "dense": test.dense[:1]}
    fp32 = session((teacher_dir / "model.onnx").read_bytes(), THREADS)
    small = session(compressed.read_bytes(), THREADS)
    torch.set_num_threads(THREADS)
    module = load_trained(teacher_dir).module
    sp, de = torch.from_numpy(feed["sparse"]), torch.from_numpy(feed["dense"])
    sp1, de1 = torch.from_numpy(one["sparse"]), torch.from_numpy(one["dense"])

    def eager(s, d):
        with torch.inference_mode():
            return torch.sigmoid(module(s, d))

    rounds = interleaved({"compressed_onnx": lambda: small.run(None, feed), "fp32_onnx": lambda: fp32.run(None, feed),
                          "pytorch_eager": lambda: eager(sp, de)})
    latency = percentiles({"compressed_onnx": lambda: small.run(None, one), "fp32_onnx": lambda: fp32.run(None, one),
                           "pytorch_eager": lambda: eager(sp1, de1)})
    return {
        "batch": BATCH, "threads": THREADS, "rows_per_s": {k: BATCH / float(np.median(v)) for k, v in rounds.items()},
        "batch1_latency": latency,
        "throughput_ratio_vs_fp32_onnx": paired_ratio(rounds["fp32_onnx"], rounds["compressed_onnx"]),
        "throughput_ratio_vs_pytorch_eager": paired_ratio(rounds["pytorch_eager"], rounds["compressed_onnx"]),
    }


def markdown(r: dict) -> str:
    b = r["budget"]
    lines = ["### Compression: one command, five datasets", "",
             f"`recserve compress TEACHER --data SPEC --out DIR --max-auc-loss {b['max_relative_auc_loss']} "
             f"--min-size-ratio {b['min_size_ratio']} --min-throughput-ratio {b['min_throughput_ratio']}` "
             "(test split, scored once after the search chose on validation):", "",
             "| dataset | test loss | val loss | size | throughput | distinct | search s | chosen | gate |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, d in r["datasets"].items():
        s = d["search"]
        lines.append(f"| {name} | {s['relative_auc_loss']:+.3%} ± {s['relative_auc_loss_se']:.3%} | "
                     f"{s['validation_relative_auc_loss']:+.3%} | {s['size_ratio']:.1f}x | "
                     f"{_x(s['throughput_ratio'])} | {s['distinct_score_ratio']:.3f} | {d['command_seconds']:.0f} | "
                     f"{s['chosen']} | {'passed' if s['gate_passed'] else 'FAILED'} |")
    lines += ["", "The fixed `recipes/ranker-8x.yaml` on the same teachers, for comparison:", "",
              "| dataset | test loss | size | distinct | gate |", "|---|---:|---:|---:|---|"]
    for name, d in r["datasets"].items():
        s = d["ranker_8x"]
        verdict = "passed" if s["gate_passed"] else "FAILED: " + "; ".join(s["reasons"])
        lines.append(f"| {name} | {s['relative_auc_loss']:+.3%} | {s['size_ratio']:.1f}x | "
                     f"{s['distinct_score_ratio']:.3f} | {verdict} |")
    s = r["speed"]
    lines += ["", f"Batch {s['batch']}, {s['threads']} threads, interleaved in one run ({s['data']}):", "",
              "| model | rows/s | batch-1 p50 ms | batch-1 p99 ms |", "|---|---:|---:|---:|"]
    for k, v in s["rows_per_s"].items():
        lat = s["batch1_latency"][k]
        lines.append(f"| {k} | {v:,.0f} | {lat['p50_ms']:.3f} | {lat['p99_ms']:.3f} |")
    lines += ["", f"Compressed throughput: **{s['throughput_ratio_vs_fp32_onnx']:.2f}x** the FP32 ONNX model, "
              f"**{s['throughput_ratio_vs_pytorch_eager']:.2f}x** PyTorch eager. Bar met on every dataset: "
              f"**{'yes' if r['bar_met'] else 'no'}**."]
    return "\n".join(lines)


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}x"


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        result = run(Path(tmp))
    print(json.dumps(result, indent=2))
    print(markdown(result))
