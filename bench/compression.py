"""Compression benchmark (issue 2's bar).

Trains the reference DCN-v2 ranker on MovieLens-100k (``../shared/datasets``; the synthetic log
when that folder is absent), compresses it with every ranker recipe in ``recipes/``, and measures
in one run, interleaved, with 2 threads at batch 256: the FP32 ONNX model and PyTorch eager
against the ``ranker-8x`` result. Sizes are bytes on disk; quality is held-out AUC.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.timing import interleaved, paired_ratio, percentiles
from recserve.converters.evaluate import session
from recserve.converters.pipeline import compress
from recserve.converters.recipe import load_recipe
from recserve.data import load_dataset
from recserve.models.artifact import load_trained
from recserve.models.pipeline import train_model

ROOT = Path(__file__).resolve().parent.parent
MOVIELENS = ROOT.parent / "shared" / "datasets" / "movielens_100k"
RANKER_RECIPES = ["ranker-8x", "ranker-structured", "post-training-int8", "ranker-fp16"]
THREADS = 2
BATCH = 256


def data_spec() -> str:
    return f"movielens:{MOVIELENS}" if (MOVIELENS / "u.data").exists() else "synthetic:100000"


def run(workdir: Path) -> dict:
    spec = data_spec()
    teacher_dir = workdir / "teacher"
    trained = train_model(spec, "ranker", teacher_dir, epochs=6)
    recipes = {}
    for name in RANKER_RECIPES:
        report = compress(teacher_dir, load_recipe(ROOT / "recipes" / f"{name}.yaml"), workdir / name,
                          data_spec=spec, speed=False)
        recipes[name] = {
            "size_ratio": report["size_ratio"], "relative_auc_loss": report["relative_auc_loss"],
            "auc": report["result"]["quality"]["auc"], "baseline_auc": report["baseline"]["quality"]["auc"],
            "bytes": report["result"]["size_bytes"], "baseline_bytes": report["baseline"]["size_bytes"],
            "gate_passed": report["gate"]["passed"], "stages": [s["name"] for s in report["stages"]],
        }
    speed = measure(teacher_dir, workdir / "ranker-8x" / "model.onnx", spec)
    return {"data": spec, "teacher": trained, "recipes": recipes, "speed": speed}


def measure(teacher_dir: Path, compressed: Path, spec: str) -> dict:
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

    rounds = interleaved({
        "compressed_onnx": lambda: small.run(None, feed),
        "fp32_onnx": lambda: fp32.run(None, feed),
        "pytorch_eager": lambda: eager(sp, de),
    })
    latency = percentiles({
        "compressed_onnx": lambda: small.run(None, one),
        "fp32_onnx": lambda: fp32.run(None, one),
        "pytorch_eager": lambda: eager(sp1, de1),
    })
    rows_per_s = {k: BATCH / float(np.median(v)) for k, v in rounds.items()}
    return {
        "batch": BATCH, "threads": THREADS, "rows_per_s": rows_per_s, "batch1_latency": latency,
        "throughput_ratio_vs_fp32_onnx": paired_ratio(rounds["fp32_onnx"], rounds["compressed_onnx"]),
        "throughput_ratio_vs_pytorch_eager": paired_ratio(rounds["pytorch_eager"], rounds["compressed_onnx"]),
    }


def markdown(r: dict) -> str:
    lines = [f"### Compression ({r['data']})", "",
             "| recipe | stages | size ratio | AUC | relative AUC loss | gate |", "|---|---|---:|---:|---:|---|"]
    for name, x in r["recipes"].items():
        lines.append(f"| {name} | {' -> '.join(x['stages'])} | {x['size_ratio']:.1f}x | {x['auc']:.4f} "
                     f"(baseline {x['baseline_auc']:.4f}) | {x['relative_auc_loss']:+.4%} | "
                     f"{'passed' if x['gate_passed'] else 'FAILED'} |")
    s = r["speed"]
    lines += ["", f"Batch {s['batch']}, {s['threads']} threads, interleaved in one run:", "",
              "| model | rows/s | batch-1 p50 ms | batch-1 p99 ms |", "|---|---:|---:|---:|"]
    for k, v in s["rows_per_s"].items():
        lat = s["batch1_latency"][k]
        lines.append(f"| {k} | {v:,.0f} | {lat['p50_ms']:.3f} | {lat['p99_ms']:.3f} |")
    lines += ["", f"ranker-8x throughput: **{s['throughput_ratio_vs_fp32_onnx']:.2f}x** the FP32 ONNX model, "
              f"**{s['throughput_ratio_vs_pytorch_eager']:.2f}x** PyTorch eager (paired ratios, median of rounds)."]
    return "\n".join(lines)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        result = run(Path(tmp))
    print(json.dumps(result, indent=2))
    print(markdown(result))
