"""The ``search`` ensemble (issue 19) on the embedded Triton: a typed query -> tokenizer -> encoder -> the
nearest products -> the search ranker -> top 10, over the whole catalog; and the ranker's quality.

Data as in ``bench/encoder.py`` (Home Depot when present, else synthetic). The encoder is the one the encoder
benchmark wrote and its gate passed (``encoder-recipe``; the titles embedded by the teacher when its recipe says
``catalog: teacher``), else its INT8 dynamic one, else the packaged encoder quantized here (INT8 dynamic).
``recserve search-index``'s own code builds the repository (the ranker trained
on the tuning queries' judgments, chosen on a validation share of them); the same repository also gets a
``search_nearest`` ensemble that ends at the nearest products (what ``--no-ranker`` builds), and the two are
called in turn, one typed query per call, after 20 warm-up calls each: the ranker's cost is their ratio.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from bench.encoder import HOME_DEPOT, SHARED
from recserve.data.search import load_search

CALLS = 300


def encoder_dir(workdir: Path) -> tuple[Path, str, Path | None]:
    """(the query encoder, its name, the encoder that embeds the titles: None for the query encoder itself)."""
    from recserve.encoder.export import export_encoder
    from recserve.encoder.pipeline import quantize_encoder
    from recserve.encoder.report import EncoderReport

    teacher = workdir / "encoder"
    recipe = workdir / "encoder-recipe"
    if (recipe / "model.onnx").exists():
        report = EncoderReport.model_validate_json((recipe / "report.json").read_text())
        return recipe, "encoder-recipe", teacher if report.catalog == "teacher" else None
    if not (workdir / "int8_dynamic" / "model.onnx").exists():
        if not teacher.exists():
            export_encoder(teacher)
        quantize_encoder(teacher, workdir / "int8_dynamic", "int8_dynamic", None)
    return workdir / "int8_dynamic", "int8_dynamic", None


def run(workdir: Path) -> dict:
    from recserve.converters.triton_config import to_pbtxt
    from recserve.encoder.artifact import load_info
    from recserve.triton.client import TritonClient
    from recserve.triton.ensembles import search_configs
    from recserve.triton.search import build_search
    from recserve.triton.server import EmbeddedTriton, ServerSettings

    spec = f"search:{HOME_DEPOT},query=search_term" if HOME_DEPOT.exists() else "synthetic:2000,products=8000"
    data = load_search(spec)
    queries = data.split(held_out=True)[0][:CALLS]
    encoder, name, catalog_encoder = encoder_dir(workdir)
    repo = workdir / "search-repo"
    if repo.exists():
        shutil.rmtree(repo)
    t0 = time.perf_counter()
    built = build_search(encoder, spec, repo, catalog_encoder=catalog_encoder)
    seconds = time.perf_counter() - t0
    nearest = search_configs(load_info(encoder).dim)[-1]
    nearest.name = "search_nearest"
    (repo / nearest.name / "1").mkdir(parents=True)
    (repo / nearest.name / "config.pbtxt").write_text(to_pbtxt(nearest))
    ensembles = ("search", "search_nearest") if built.ranker.kept else ("search_nearest",)
    times: dict[str, list[float]] = {e: [] for e in ensembles}
    server = EmbeddedTriton(ServerSettings.on_free_ports(repo)).start()
    try:
        with TritonClient(server.grpc_url) as client:
            def ask(ensemble: str, q: str) -> float:
                t = time.perf_counter()
                client.infer(ensemble, {"query": np.array([q.encode()], dtype=object),
                                        "top_k": np.array([10], np.int32)})
                return (time.perf_counter() - t) * 1e3

            for q in queries[:20]:
                for e in ensembles:
                    ask(e, q)
            for q in queries:
                for e in ensembles:
                    times[e].append(ask(e, q))
    finally:
        server.stop()
    return {"data": spec.replace(str(SHARED), "../shared/datasets"), "products": len(data.titles), "encoder": name,
            "titles_embedded_by": "teacher" if catalog_encoder else name,
            "build_s": round(seconds, 1), "ranker": built.ranker.model_dump(mode="json"),
            "latency": {e: {"calls": len(t), "p50_ms": float(np.percentile(t, 50)), "p99_ms": float(np.percentile(t, 99))}
                        for e, t in times.items()}}


def markdown(r: dict) -> str:
    k = r["ranker"]
    lines = ["### Search: typed query -> encoder -> nearest products -> ranker, on Triton", "",
             f"{r['data']}, {r['products']:,} products, the {r['encoder']} encoder (titles embedded by "
             f"{r['titles_embedded_by']}); `recserve search-index` took "
             f"{r['build_s']:.0f} s. The ranker ({k['hidden']} hidden units, {k['steps']} steps, "
             f"{k['training_queries']:,} training queries, reordering the {k['depth']} nearest): "
             f"{'kept' if k['kept'] else 'not kept (no better on validation)'}.", "",
             "| queries | n | NDCG@10 encoder | NDCG@10 ranker | recall@10 encoder | recall@10 ranker |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in ("validation", "held_out"):
        q = k[name]
        lines.append(f"| {name} | {q['queries']:,} | {q['encoder_ndcg_at_10']:.4f} | {q['ranker_ndcg_at_10']:.4f} | "
                     f"{q['encoder_recall_at_10']:.4f} | {q['ranker_recall_at_10']:.4f} |")
    lines += ["", "| ensemble | calls | p50 ms | p99 ms |", "|---|---:|---:|---:|"]
    for e, t in r["latency"].items():
        lines.append(f"| {e} | {t['calls']} | {t['p50_ms']:.2f} | {t['p99_ms']:.2f} |")
    if "search" in r["latency"]:
        ratio = r["latency"]["search"]["p50_ms"] / r["latency"]["search_nearest"]["p50_ms"]
        lines += ["", f"The ranker's steps cost {ratio:.2f}x the p50 of the nearest products alone (bar: the "
                  "`search` ensemble's p50 < 10 ms)."]
    return "\n".join(lines)
