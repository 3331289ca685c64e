"""The ``recserve`` command: one thin subcommand per component."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from recserve.errors import ConfigError, GateFailed, RecserveError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress, compile, serve, route and roll out large recommendation models.")
console = Console()
err = Console(stderr=True)


class ModelKindOpt(str, Enum):
    ranker = "ranker"
    two_tower = "two-tower"


@app.command()
def train(
    data: Annotated[str, typer.Option(help="criteo:PATH, movielens:DIR, interactions:PATH or synthetic[:ROWS]")],
    out: Annotated[Path, typer.Option(help="output directory (model.onnx, model.pt, model.json, preprocessing.json)")],
    model: Annotated[ModelKindOpt, typer.Option(help="which reference model")] = ModelKindOpt.ranker,
    epochs: Annotated[int, typer.Option(min=1, help="the epoch with the best validation AUC is kept")] = 6,
    embedding_dim: Annotated[int, typer.Option(min=1)] = 32,
    batch_size: Annotated[int, typer.Option(min=1)] = 1024,
    learning_rate: Annotated[float, typer.Option(min=0.0)] = 2e-3,
    seed: int = 0,
) -> None:
    """Train a reference ranker or two-tower retriever on CPU and export it to ONNX."""
    from recserve.models.pipeline import train_model

    settings = dict(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed)
    result = train_model(data, model.value, out, embedding_dim=embedding_dim, **settings)
    quality = ", ".join(f"{k} {v:.4f}" for k, v in result["quality"].items())
    console.print(f"[green]trained[/green] {model.value} on {data}: held-out {quality}; "
                  f"{result['parameters']:,} parameters, {result['size_bytes'] / 1024:,.1f} KiB -> {out}/model.onnx")


@app.command()
def compress(
    model: Annotated[Path, typer.Argument(help="a `recserve train` output directory or a plain .onnx file")],
    recipe: Annotated[Path, typer.Option(help="compression recipe (YAML); see recipes/")],
    out: Annotated[Path, typer.Option(help="output directory (model.onnx, report.json, report.png)")],
    data: Annotated[Optional[str], typer.Option(help="dataset spec; defaults to the recipe's, then the model's")] = None,
    speed: Annotated[bool, typer.Option(help="measure onnxruntime latency and throughput per stage")] = True,
) -> None:
    """Compress a recommender stage by stage, evaluate every stage on held-out data, and gate the result."""
    from recserve.converters.pipeline import compress as run
    from recserve.converters.recipe import load_recipe
    from recserve.converters.report import report_table

    spec = load_recipe(recipe)
    with console.status("compressing") as status:
        report = run(model, spec, out, data_spec=data, speed=speed, on_stage=lambda s: status.update(s))
    console.print(report_table(report))
    console.print(f"report: {out}/report.json, plot: {out}/report.png")
    if not report["gate"]["passed"]:
        raise GateFailed(report["gate"]["reasons"])
    console.print(f"[green]gate passed[/green]: {out}/model.onnx is {report['size_ratio']:.1f}x smaller, "
                  f"relative AUC loss {report['relative_auc_loss']:+.4%}")


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
