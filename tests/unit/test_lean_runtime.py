"""The serving runtime imports only what it runs: each entry point of the router, the operator and the Triton
python models, imported in a fresh interpreter, loads neither torch nor scikit-learn (seconds of start-up and
hundreds of MB in every router replica and every Triton python stub)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "sklearn", "scipy", "matplotlib", "transformers", "sentence_transformers")
"""The training and evaluation stack: none of it belongs in a serving process. (pandas is not listed: Ray Serve
imports it itself whenever it is installed, as Ray Train's extra installs it; recserve's serving code never
does, which :func:`test_serving_code_never_imports_pandas` checks.)"""

STUB = ("import sys, types; "
        "sys.modules['triton_python_backend_utils'] = types.ModuleType('triton_python_backend_utils'); ")
"""Triton's python backend provides this module at run time; an empty stand-in lets the models import."""

ENTRY_POINTS = [
    "recserve.serving.app",  # the Ray Serve application (import_path recserve.serving.app:app)
    "recserve.serving.router",
    "recserve.serving.grpc_server",
    "recserve.serving.scorers",
    "recserve.serving.rank_cli",
    "recserve.triton.supervisor",  # runs in the router process (`recserve route --triton-repo`)
    "recserve.operator.handlers",
    "recserve.triton.models.item_index",
    "recserve.triton.models.recommend_preprocess",
    "recserve.triton.models.recommend_topk",
    "recserve.triton.models.retrieve_preprocess",
    "recserve.triton.models.query_tokenize",
    "recserve.triton.models.product_index",
    "recserve.triton.search",
    "recserve.triton.search_features",
    "recserve.rowwise",
    "recserve.encoder.text",  # the query tokenizer, wherever an encoder serves
    "recserve.encoder.artifact",
]


def loaded_by(code: str) -> list[str]:
    report = f"; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", "import sys; " + code + report],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return [m for m in out.stdout.strip().split(",") if m]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_a_serving_entry_point_loads_no_training_stack(module: str) -> None:
    assert loaded_by(f"{STUB}import {module}") == []


@pytest.mark.parametrize("model", sorted(p.parent.parent.name for p in (ROOT / "model_repository").glob("*/1/model.py")))
def test_a_triton_python_model_loads_no_training_stack(model: str) -> None:
    path = ROOT / "model_repository" / model / "1" / "model.py"
    code = f"{STUB}import runpy; runpy.run_path({str(path)!r})"
    assert loaded_by(code) == []


def test_the_onnxruntime_backend_loads_no_training_stack() -> None:
    path = ROOT / "recserve" / "triton" / "backends" / "onnxruntime" / "model.py"
    assert loaded_by(f"{STUB}import runpy; runpy.run_path({str(path)!r})") == []


def test_the_check_sees_the_training_stack_when_it_is_there() -> None:
    """The same check on a module that does import it (training): the test can fail."""
    assert "torch" in loaded_by("import recserve.models.train")


def test_serving_code_never_imports_pandas() -> None:
    """No module of the serving runtime imports pandas (only Ray Serve's own code may, when it is installed)."""
    serving = [*(ROOT / "recserve" / "serving").rglob("*.py"), *(ROOT / "recserve" / "triton").rglob("*.py"),
               *(ROOT / "recserve" / "operator").rglob("*.py"), *(ROOT / "recserve" / "encoder").glob("text.py")]
    assert serving
    offenders = [str(p.relative_to(ROOT)) for p in serving
                 if any(line.strip().startswith(("import pandas", "from pandas")) for line in p.read_text().splitlines())]
    assert offenders == []
