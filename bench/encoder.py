"""Query encoder benchmark (issue 19): the packaged all-MiniLM-L6-v2 exported to ONNX (the teacher, FP32) and its
INT8 dynamic quantization, judged on search data: products retrieved for the held-out half of the queries
(split by their text; nothing here is tuned, so the tuning half is unused) from the whole corpus, against the
raters' graded labels; agreement with the teacher; bytes; CPU speed at batch 1 and 64 for 16 tokens, the two
encoders in turn round after round in one run.

Data: Home Depot's product search relevance (``../shared/datasets/home_depot_search``: real queries and
titles) when present, else the project's synthetic search text. Issue 19's bar: the compressed encoder at least
4x smaller, 3x the FP32 throughput at batch 64, NDCG@10 at most 2% (relative) lower, top-10 overlap >= 0.8.
"""

from __future__ import annotations

from pathlib import Path

from bench.compression import SHARED
from recserve.data.search import load_search
from recserve.encoder.evaluate import Encoder, judge, speeds
from recserve.encoder.export import export_encoder
from recserve.encoder.quantize import quantize_int8

HOME_DEPOT = SHARED / "home_depot_search" / "search_relevance.csv"
BAR = {"min_size_ratio": 4.0, "min_throughput_ratio": 3.0, "max_relative_ndcg_loss": 0.02,
       "min_teacher_overlap_at_10": 0.8}


def run(workdir: Path) -> dict:
    spec = f"search:{HOME_DEPOT},query=search_term" if HOME_DEPOT.exists() else "synthetic:2000,products=8000"
    data = load_search(spec)
    queries, _ = data.split(held_out=True)
    teacher_dir, int8_dir = workdir / "encoder", workdir / "encoder-int8"
    if not teacher_dir.exists():
        export_encoder(teacher_dir)
    quantize_int8(teacher_dir, int8_dir, force=True)
    encoders = {"fp32": Encoder(teacher_dir), "int8-dynamic": Encoder(int8_dir)}
    out: dict = {"data": spec.replace(str(SHARED), "../shared/datasets"), "products": len(data.titles),
                 "held_out_queries": len(queries), "models": judge(encoders, data, teacher="fp32")}
    speed = speeds(encoders, queries[:64])
    for name, by_batch in speed.items():
        out["models"][name]["speed"] = {str(b): vars(s) for b, s in by_batch.items()}
        out["models"][name]["throughput_ratio"] = by_batch[64].texts_per_s / speed["fp32"][64].texts_per_s
    best = out["models"]["int8-dynamic"]
    out["bar"] = BAR
    out["bar_met"] = bool(best["size_ratio"] >= BAR["min_size_ratio"]
                          and best["throughput_ratio"] >= BAR["min_throughput_ratio"]
                          and best["relative_ndcg_loss"] <= BAR["max_relative_ndcg_loss"]
                          and best["teacher_overlap_at_10"] >= BAR["min_teacher_overlap_at_10"])
    return out


def markdown(r: dict) -> str:
    lines = ["### Query encoder: all-MiniLM-L6-v2 on search data", "",
             f"{r['data']}: {r['held_out_queries']:,} held-out queries against {r['products']:,} products "
             "(unjudged products count as gain 0); CPU, 2 threads, 16 tokens:", "",
             "| encoder | MiB | size | NDCG@10 | recall@10 | NDCG loss | overlap@10 | cosine | b1 ms | b64 texts/s "
             "| throughput |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in r["models"].items():
        lines.append(f"| {name} | {m['bytes'] / 2**20:.1f} | {m['size_ratio']:.2f}x | {m['ndcg_at_10']:.4f} | "
                     f"{m['recall_at_10']:.4f} | {m['relative_ndcg_loss']:+.2%} | {m['teacher_overlap_at_10']:.3f} | "
                     f"{m['mean_cosine']:.4f} | {m['speed']['1']['ms_per_batch']:.2f} | "
                     f"{m['speed']['64']['texts_per_s']:,.0f} | {m['throughput_ratio']:.2f}x |")
    lines += ["", f"Issue 19's bar (>= 4x smaller, >= 3x throughput at batch 64, <= 2% NDCG loss, overlap >= 0.8) "
              f"met: **{'yes' if r['bar_met'] else 'no'}** (INT8 alone; distillation and vocabulary pruning are "
              "not built yet)."]
    return "\n".join(lines)
