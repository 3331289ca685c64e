"""Query encoder benchmark (issue 19): the packaged all-MiniLM-L6-v2 exported to ONNX (the teacher, FP32), the
shipped recipe ``recipes/query-encoder.yaml`` run by ``recserve compress`` (distillation to 3 layers, the
vocabulary pruned, INT8), and each precision alone (INT8 dynamic, also with its outlier channels float, INT8
static QDQ, FP16), judged on search data: products retrieved for the held-out half of the queries (split by
their text; only the tuning half and the titles are learned from) from the whole corpus, against the raters'
graded labels; agreement with the teacher; bytes; CPU speed at batch 1 and 64 for 16 tokens, the encoders in
turn round after round in one run.

Data: Home Depot's product search relevance (``../shared/datasets/home_depot_search``: real queries and
titles) when present, else the project's synthetic search text. Issue 19's bar: the compressed encoder at least
4x smaller, 3x the FP32 throughput at batch 64, NDCG@10 at most 2% (relative) lower, top-10 overlap >= 0.8.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.compression import SHARED
from recserve.data.search import load_search
from recserve.encoder.evaluate import Encoder, judge, speeds
from recserve.encoder.export import export_encoder
from recserve.encoder.pipeline import compress_encoder, quantize_encoder, tuning_texts
from recserve.encoder.quantize import needs_calibration
from recserve.encoder.recipe import load_encoder_recipe

ROOT = Path(__file__).resolve().parents[1]
HOME_DEPOT = SHARED / "home_depot_search" / "search_relevance.csv"
RECIPE = ROOT / "recipes" / "query-encoder.yaml"
MODES = ("int8_dynamic", "int8_static", "fp16")
PRECISIONS = {mode: (mode, None) for mode in MODES} | {"int8_dynamic_outliers": ("int8_dynamic", 2.0)}
"""Each precision alone: name -> (mode, outlier_ratio)."""


def run(workdir: Path) -> dict:
    spec = f"search:{HOME_DEPOT},query=search_term" if HOME_DEPOT.exists() else "synthetic:2000,products=8000"
    data = load_search(spec)
    queries, _ = data.split(held_out=True)
    teacher = workdir / "encoder"
    if not teacher.exists():
        export_encoder(teacher)
    recipe = load_encoder_recipe(RECIPE)
    t0 = time.perf_counter()
    report = compress_encoder(teacher, recipe, workdir / "encoder-recipe", data_spec=spec, force=True)
    seconds = time.perf_counter() - t0
    for name, (mode, ratio) in PRECISIONS.items():
        calibration = tuning_texts(data, 0, 512) if needs_calibration(mode, ratio) else None
        quantize_encoder(teacher, workdir / name, mode, calibration, ratio)
    encoders = {"fp32": Encoder(teacher)} | {name: Encoder(workdir / name) for name in PRECISIONS}
    out: dict = {"data": spec.replace(str(SHARED), "../shared/datasets"), "products": len(data.titles),
                 "held_out_queries": len(queries), "models": judge(encoders, data, teacher="fp32")}
    speed = speeds(encoders, queries[:64])
    for name, by_batch in speed.items():
        out["models"][name]["speed"] = {str(b): vars(s) for b, s in by_batch.items()}
        out["models"][name]["throughput_ratio"] = by_batch[64].texts_per_s / speed["fp32"][64].texts_per_s
    out["recipe"] = report.model_dump(mode="json") | {"seconds": round(seconds, 1)}
    out["bar"] = recipe.gate.model_dump(exclude_none=True)
    out["bar_met"] = report.gate.passed
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
    rep = r["recipe"]
    t, res = rep["teacher"], rep["result"]
    lines += ["", f"The recipe `recipes/query-encoder.yaml` (`recserve compress`, {rep['seconds']:.0f} s; "
              f"{' -> '.join(rep['compression'])}), its own run against the same teacher (titles embedded by "
              f"{'the teacher' if rep.get('catalog') == 'teacher' else 'each encoder'}):", "",
              "| | MiB | NDCG@10 | recall@10 | overlap@10 | b1 ms | b64 texts/s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in (("teacher", t), ("recipe", res)):
        lines.append(f"| {name} | {m['bytes'] / 2**20:.1f} | {m['ndcg_at_10']:.4f} | {m['recall_at_10']:.4f} | "
                     f"{m['teacher_overlap_at_10']:.3f} | {m['ms_b1']:.2f} | {m['texts_per_s_b64']:,.0f} |")
    lines += ["", f"size {rep['size_ratio']:.2f}x, throughput {rep['throughput_ratio']:.2f}x, relative NDCG@10 loss "
              f"{rep['relative_ndcg_loss']:+.2%}, top-10 overlap {rep['teacher_overlap_at_10']:.3f}: gate "
              f"**{'passed' if r['bar_met'] else 'failed'}**"
              + ("" if r["bar_met"] else f" ({'; '.join(rep['gate']['reasons'])})") + "."]
    return "\n".join(lines)
