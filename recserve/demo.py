"""``make demo``: the main job end to end on the embedded defaults (synthetic data).

Trains the reference DCN-v2 ranker on a synthetic e-commerce search log, compresses it with
``recipes/ranker-8x.yaml`` and prints the compression report. Later stages of the project
(Triton, router, load test) extend this script.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from recserve.converters.pipeline import compress
from recserve.converters.recipe import load_recipe
from recserve.converters.report import report_table
from recserve.errors import RecserveError
from recserve.models.pipeline import train_model

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".demo"))
    parser.add_argument("--data", default="synthetic:100000")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "ranker-8x.yaml")
    args = parser.parse_args(argv)
    console = Console()
    try:
        console.rule("1. train the reference ranker")
        result = train_model(args.data, "ranker", args.workdir / "ranker", epochs=6)
        console.print(f"held-out AUC {result['quality']['auc']:.4f}, {result['parameters']:,} parameters, "
                      f"{result['size_bytes'] / 1024:,.0f} KiB")
        console.rule(f"2. compress with {args.recipe.name}")
        with console.status("compressing") as status:
            report = compress(args.workdir / "ranker", load_recipe(args.recipe), args.workdir / "compressed",
                              data_spec=args.data, on_stage=status.update)
        console.print(report_table(report))
        console.print(f"report: {args.workdir}/compressed/report.json and report.png")
    except RecserveError as e:
        console.print(f"[red]error:[/red] {e}")
        return e.exit_code
    return 0 if report["gate"]["passed"] else 3


if __name__ == "__main__":
    sys.exit(main())
