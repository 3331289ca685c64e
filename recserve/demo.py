"""``make demo``: the main job end to end on the embedded defaults (synthetic data).

1. trains the reference DCN-v2 ranker on a synthetic e-commerce search log;
2. compresses it with ``recipes/ranker-search.yaml`` (the smallest model within 0.1% AUC of it,
   found on validation and gated on the test split) and prints the report;
3. builds the compressed ranker into a Triton model repository with the ensembles, starts the
   real embedded tritonserver and sends gRPC requests: the ranker directly, and the ``recommend``
   ensemble with raw features;
4. starts the Ray Serve router in front of it (cloud: Triton; edge: the compressed model in
   process), sends Rank calls over gRPC;
5. runs a short open-loop load test against Triton and the router and prints its table; then
   stops Triton and shows the edge answering;
6. search: exports the packaged text encoder (all-MiniLM-L6-v2) to ONNX, builds the ``search`` ensemble
   (tokenizer -> encoder -> nearest products -> a ranker trained on the judged queries) over a synthetic
   catalog, and answers typed queries.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from rich.console import Console

from recserve.converters.pipeline import compress
from recserve.converters.recipe import load_recipe
from recserve.converters.report import pareto_table, report_table
from recserve.errors import RecserveError
from recserve.models.pipeline import train_model

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".demo"))
    parser.add_argument("--data", default="synthetic:100000")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "ranker-search.yaml")
    args = parser.parse_args(argv)
    console = Console()
    try:
        console.rule("1. train the reference ranker")
        result = train_model(args.data, "ranker", args.workdir / "ranker", epochs=6, force=True)
        console.print(f"held-out AUC {result['quality']['auc']:.4f}, {result['parameters']:,} parameters, "
                      f"{result['size_bytes'] / 1024:,.0f} KiB")
        console.rule(f"2. compress with {args.recipe.name}")
        with console.status("compressing") as status:
            # --force: the demo replaces its own earlier output
            report = compress(args.workdir / "ranker", load_recipe(args.recipe), args.workdir / "compressed",
                              data_spec=args.data, on_stage=status.update, force=True)
        console.print(report_table(report))
        if report.pareto:
            console.print(pareto_table(report))
        console.print(f"report: {args.workdir}/compressed/report.json and report.png")
        if not report.gate.passed:
            return 3
        serve_demo(console, args.workdir, args.data)
        search_demo(console, args.workdir)
    except RecserveError as e:
        console.print(f"[red]error:[/red] {e}")
        return e.exit_code
    return 0


def serve_demo(console: Console, workdir: Path, data_spec: str) -> None:
    import numpy as np

    from recserve.converters.build import build
    from recserve.converters.triton_config import BuildProfile
    from recserve.data import load_dataset
    from recserve.triton.client import TritonClient
    from recserve.triton.ensembles import write_ensembles
    from recserve.triton.features import FeatureEncoder, read_columns
    from recserve.triton.server import EmbeddedTriton, ServerSettings

    console.rule("3. build the Triton repository and serve it")
    repo = workdir / "model_repository"
    if repo.exists():
        shutil.rmtree(repo)
    built = build(workdir / "compressed", "ranker", "onnxruntime", repo, BuildProfile(preferred_batch_sizes=[64]))
    write_ensembles(repo)
    console.print(f"built {built.version_dir}; ensembles: recommend, retrieve")
    pre = workdir / "compressed" / "preprocessing.json"
    data = load_dataset(data_spec, preprocessing=pre)
    test = data.ranking_test
    encoder = FeatureEncoder.load(pre, read_columns(pre)["ranking_sparse"])
    settings = ServerSettings.on_free_ports(repo, model_control="explicit",
                                            load_models=["ranker", "recommend_preprocess", "recommend_topk", "recommend"])
    with console.status("starting tritonserver"):
        server = EmbeddedTriton(settings).start()
    try:
        console.print(f"Triton ready: gRPC {server.grpc_url}, HTTP {server.http_url}, metrics {server.metrics_url}")
        with TritonClient(server.grpc_url) as client:
            scores = client.infer("ranker", {"sparse": test.sparse[:4], "dense": test.dense[:4]})["score"]
            console.print(f"ranker (gRPC, 4 rows): scores {', '.join(f'{v:.4f}' for v in scores.ravel())}; "
                          f"labels {', '.join(str(int(v)) for v in test.label[:4])}")
            raw_sparse, raw_dense = encoder.decode(test.sparse[:50], test.dense[:50])
            items = np.array([f"item-{v}".encode() for v in raw_sparse[:, 1]], dtype=object)
            out = client.infer("recommend", {"sparse_raw": raw_sparse.astype(np.bytes_).astype(object),
                                             "dense_raw": raw_dense, "item_ids": items,
                                             "top_k": np.array([5], np.int32)})
            best = ", ".join(f"{i.decode()} {s:.4f}" for i, s in zip(out["items"], out["scores"]))
            console.print(f"recommend ensemble (50 raw candidates -> top 5): {best}")
        router_demo(console, workdir, data_spec, server, test, encoder)
    finally:
        server.stop()


def search_demo(console: Console, workdir: Path, catalog: str = "synthetic:200,products=1500") -> None:
    """A typed query through the Triton ``search`` ensemble."""
    import numpy as np

    from recserve.data.search import load_search
    from recserve.encoder.export import export_encoder
    from recserve.triton.client import TritonClient
    from recserve.triton.search import build_search
    from recserve.triton.server import EmbeddedTriton, ServerSettings

    console.rule("6. search on Triton: tokenize -> encode -> nearest products -> rank")
    repo = workdir / "search_repository"
    if repo.exists():
        shutil.rmtree(repo)
    with console.status("exporting the packaged text encoder") as status:
        export_encoder(workdir / "encoder", force=True)
        ranker = build_search(workdir / "encoder", catalog, repo, progress=status.update).ranker
    q = ranker.held_out
    console.print(f"search ranker ({'kept' if ranker.kept else 'not kept: no better on validation'}): NDCG@10 on "
                  f"{q.queries} held-out queries {q.encoder_ndcg_at_10:.3f} in the encoder's order, "
                  f"{q.ranker_ndcg_at_10:.3f} in the ranker's", highlight=False)
    data = load_search(catalog)
    titles = dict(zip(data.product_ids, data.titles))
    with console.status("starting tritonserver"):
        server = EmbeddedTriton(ServerSettings.on_free_ports(repo)).start()
    try:
        with TritonClient(server.grpc_url) as client:
            for query in data.split(held_out=True)[0][:3]:
                out = client.infer("search", {"query": np.array([query.encode()], dtype=object),
                                              "top_k": np.array([3], np.int32)})
                found = "; ".join(f"{titles[i.decode()]} ({s:.2f})" for i, s in zip(out["items"], out["scores"]))
                console.print(f"[bold]{query!r}[/bold] -> {found}", soft_wrap=True)
    finally:
        server.stop()


def load_demo(console: Console, triton_url: str, router_url: str, catalog: Path, preprocessing: Path) -> None:
    """A short open-loop load test, straight at Triton and through the router."""
    from recserve.loadtest import generator
    from recserve.loadtest.report import runs_table
    from recserve.loadtest.scenario import Scenario

    console.rule("5. load test: open loop, Poisson arrivals, 20-100 Zipf-drawn candidates per request")
    common = {"catalog": str(catalog), "arrivals": {"process": "poisson", "rate": 100, "duration_s": 3, "warmup_s": 1},
              "requests": {"candidates_min": 20, "candidates_max": 100}, "max_lag_p99_ms": 5.0}
    runs = []
    with console.status("load testing Triton and the router (8 s)"):
        runs.append(generator.run(Scenario.model_validate(
            common | {"target": "triton", "url": triton_url, "preprocessing": str(preprocessing)})).report())
        runs.append(generator.run(Scenario.model_validate(common | {"target": "router", "url": router_url})).report())
    console.print(runs_table(runs, "100 requests/s for 3 s"))


def router_demo(console: Console, workdir: Path, data_spec: str, triton, test, encoder) -> None:
    import grpc

    from recserve.serving import app as serve_app
    from recserve.serving.client import RouterClient
    from recserve.serving.config import RouterConfig
    from recserve.serving.protos.recommender_pb2 import RankRequest
    from recserve.triton.retrieval import build_catalog_dir
    from recserve.triton.server import free_port

    console.rule("4. route: Ray Serve in front of Triton, with the edge model in process")
    compressed = workdir / "compressed"
    catalog = build_catalog_dir(compressed, data_spec, workdir / "catalog")
    cfg = RouterConfig.model_validate({
        "triton_url": triton.grpc_url, "grpc_port": free_port(), "http_port": free_port(),
        "models": {"ranker": {"rankers": [{"triton_model": "ranker", "edge_model": str(compressed / "model.onnx")}],
                              "catalog": str(catalog), "preprocessing": str(compressed / "preprocessing.json")}}})
    with console.status("starting Ray Serve"):
        serve_app.start(cfg)
    try:
        console.print(f"router ready: gRPC 127.0.0.1:{cfg.grpc_port}, HTTP http://127.0.0.1:{cfg.http_port}/v1/rank")
        raw_sparse, _ = encoder.decode(test.sparse[:20], test.dense[:20])
        names = encoder.sparse_names
        user = {"user_id": raw_sparse[0, names.index("user_id")]}
        query = raw_sparse[0, names.index("query_id")] if "query_id" in names else ""
        items = [str(v) for v in raw_sparse[:, names.index("item_id")]]
        with RouterClient(f"127.0.0.1:{cfg.grpc_port}") as client:
            for i, (label, budget) in enumerate((("50 ms budget", 0.05), ("same again (cache)", 0.05),
                                                 ("6 ms budget", 0.006))):
                cands = items if i < 2 else items[1:]  # a new key: no cache hit
                request = RankRequest(request_id=f"demo-{i}", user=user, query=query, candidate_item_ids=cands, top_k=3)
                try:
                    r = client.rank(request, timeout_s=budget)
                    console.print(f"Rank, {label}: {list(r.items)} served_by={r.served_by} ({r.reason})")
                except grpc.RpcError as e:
                    console.print(f"Rank, {label}: {e.code().name} (the proxy hop alone took the budget)")
            load_demo(console, triton.grpc_url, f"127.0.0.1:{cfg.grpc_port}", catalog,
                      compressed / "preprocessing.json")
            triton.stop()
            r = client.rank(RankRequest(request_id="demo-down", user=user, query=query, candidate_item_ids=items[::-1],
                                        top_k=3), timeout_s=0.05)
            console.print(f"Rank after Triton stopped: {list(r.items)} served_by={r.served_by} ({r.reason})")
    finally:
        serve_app.stop()


if __name__ == "__main__":
    sys.exit(main())
