"""The ``recserve`` command as users run it: ``main()`` in a subprocess, so exit codes and stderr are real.

A user mistake is one ``error:`` line and exit code 2, never a traceback; a failed gate exits 3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test starts a Python that imports torch

ROOT = Path(__file__).resolve().parents[2]
TINY = "synthetic:3000,users=100,items=150"
FP16 = "name: cli-fp16\nstages:\n  - type: quantize\n    mode: fp16\n"


def recserve(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-c", "from recserve.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, timeout=180, cwd=cwd or ROOT, env=env)


def assert_one_error_line(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("cli") / "ranker"
    proc = recserve("train", "--data", TINY, "--out", out, "--epochs", "2", "--batch-size", "128", "--embedding-dim", "4")
    return out, proc


def test_train_writes_the_artifact(trained) -> None:
    out, proc = trained
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained ranker on " + TINY in proc.stdout and "held-out auc" in proc.stdout
    assert {p.name for p in out.iterdir()} >= {"model.onnx", "model.pt", "model.json", "preprocessing.json"}
    meta = json.loads((out / "model.json").read_text())
    assert meta["kind"] == "ranker" and meta["data_spec"] == TINY and meta["config"]["embedding_dim"] == 4
    assert 0.0 < meta["metrics"]["held_out"]["auc"] <= 1.0
    # no TTY: a line per epoch instead of a bar
    epochs = [line for line in proc.stderr.splitlines() if line.startswith("train: epoch ")]
    assert [line.split(",")[0] for line in epochs] == ["train: epoch 1/2", "train: epoch 2/2"]
    assert "validation AUC" in epochs[0]


def test_train_says_how_many_corrupt_rows_it_skipped(tmp_path: Path) -> None:
    rows = ["user\titem\ttime"] + [f"u{i % 40}\ti{i % 300}\t{i}" for i in range(600)]
    rows[10] = "u1\ti2"  # a field missing
    rows[20] = "u1\ti2\tyesterday"  # not a time
    (tmp_path / "log.tsv").write_text("\n".join(rows) + "\n")
    proc = recserve("train", "--data", f"interactions:{tmp_path}/log.tsv", "--out", tmp_path / "m", "--epochs", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped 2 corrupt rows of interactions:" in proc.stderr
    assert json.loads((tmp_path / "m" / "model.json").read_text())["metrics"]["corrupt_rows"] == 2


def test_train_with_a_teacher_distils_from_its_soft_targets(trained, tmp_path: Path) -> None:
    teacher, _ = trained
    out = tmp_path / "student"
    proc = recserve("train", "--data", TINY, "--out", out, "--epochs", "2", "--batch-size", "128", "--embedding-dim", "2",
                    "--teacher", teacher)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / "model.json").read_text())
    taught = meta["metrics"]["teacher"]
    assert taught["directory"] == str(teacher)
    # the teacher scored on the student's test rows: the same number its own training reported
    own = json.loads((teacher / "model.json").read_text())["metrics"]["held_out"]["auc"]
    assert taught["held_out"]["auc"] == pytest.approx(own, abs=1e-6)
    assert f"(teacher's auc {own:.4f})" in proc.stdout
    assert json.loads((out / "preprocessing.json").read_text()) == json.loads((teacher / "preprocessing.json").read_text())
    # distilling moves the student: the same student without the teacher learns other weights
    plain = tmp_path / "plain"
    assert recserve("train", "--data", TINY, "--out", plain, "--epochs", "2", "--batch-size", "128",
                    "--embedding-dim", "2").returncode == 0
    assert (out / "model.pt").read_bytes() != (plain / "model.pt").read_bytes()
    assert_one_error_line(recserve("train", "--data", TINY, "--out", tmp_path / "x", "--teacher", tmp_path), 2,
                          "--teacher", "no model.onnx")
    assert_one_error_line(recserve("train", "--data", TINY, "--out", tmp_path / "y", "--teacher", teacher,
                                   "--model", "two-tower"), 2, "--teacher distils a ranker")


def test_compress_prints_the_table_and_passes(trained, tmp_path: Path) -> None:
    model, _ = trained
    recipe = tmp_path / "fp16.yaml"
    recipe.write_text(FP16 + "gate:\n  min_size_ratio: 1.5\n")
    out = tmp_path / "out"
    proc = recserve("compress", model, "--recipe", recipe, "--out", out, "--no-speed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for needle in ("cli-fp16 on " + TINY, "gate PASSED", "stage", "AUC", "baseline", "1. quantize", "ratio",
                   "result", "gate passed", f"{out}/model.onnx is"):
        assert needle in proc.stdout, needle
    assert (out / "model.onnx").exists() and (out / "report.json").exists() and (out / "report.png").exists()


def test_gate_failure_exits_3(trained, tmp_path: Path) -> None:
    model, _ = trained
    recipe = tmp_path / "strict.yaml"
    recipe.write_text(FP16 + "gate:\n  min_size_ratio: 1000\n")
    out = tmp_path / "out"
    proc = recserve("compress", model, "--recipe", recipe, "--out", out, "--no-speed")
    assert_one_error_line(proc, 3, "quality gate failed", "min_size_ratio 1000")
    assert "gate FAILED" in proc.stdout
    assert not (out / "model.onnx").exists() and (out / "report.json").exists()


def test_compress_with_a_budget_searches(trained, tmp_path: Path) -> None:
    model, _ = trained
    out = tmp_path / "out"
    proc = recserve("compress", model, "--out", out, "--max-auc-loss", "0.05", "--time-budget", "90s", "--no-speed")
    assert proc.returncode in (0, 3), proc.stderr[-3000:]
    # no TTY: a line per candidate on stderr, the same lines in search.log
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("search: objective size, budget 5.000% relative AUC loss, 95% confidence")
    assert any(" accepted " in line or " rejected " in line for line in lines)
    assert any(line.startswith("chose: ") for line in lines)
    log = (out / "search.log").read_text().splitlines()
    assert log[0] == lines[0] and any(line.startswith("chose: ") for line in log)
    assert "Pareto front" in proc.stdout and "gate" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "search" and report["search"]["time_budget_s"] == 90
    assert report["gate"]["limits"]["max_relative_auc_loss"] == 0.05
    # the out directory is not reused without --force
    again = recserve("compress", model, "--out", out, "--max-auc-loss", "0.05", "--no-speed")
    assert_one_error_line(again, 2, "not empty", "--force")


def test_report_prints_a_saved_report_and_json(trained, tmp_path: Path) -> None:
    model, _ = trained
    recipe = tmp_path / "fp16.yaml"
    recipe.write_text(FP16 + "gate:\n  min_size_ratio: 1.5\n")
    out = tmp_path / "out"
    proc = recserve("compress", model, "--recipe", recipe, "--out", out, "--no-speed", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)  # nothing but the report on stdout
    assert printed == json.loads((out / "report.json").read_text())
    again = recserve("report", out)
    assert again.returncode == 0 and "cli-fp16 on " + TINY in again.stdout and "1. quantize" in again.stdout
    assert json.loads(recserve("report", out / "report.json", "--json").stdout)["gate"]["passed"] is True
    # a failed gate reads back as a failure
    report = json.loads((out / "report.json").read_text())
    report["gate"] = {"passed": False, "reasons": ["size ratio 1.00x < min_size_ratio 9x"], "limits": {}}
    (tmp_path / "failed.json").write_text(json.dumps(report))
    assert_one_error_line(recserve("report", tmp_path / "failed.json"), 3, "quality gate failed", "min_size_ratio 9x")


def test_route_refuses_a_port_in_use_before_starting_anything(tmp_path: Path) -> None:
    import socket
    import time

    for name in ("m.onnx", "p.json"):
        (tmp_path / name).write_text("x")
    (tmp_path / "catalog").mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        (tmp_path / "router.yaml").write_text(
            f"grpc_port: {port}\nmodels:\n  ranker:\n    rankers:\n      - {{triton_model: ranker, edge_model: m.onnx}}\n"
            "    catalog: catalog\n    preprocessing: p.json\n")
        started = time.monotonic()
        proc = recserve("route", "--config", tmp_path / "router.yaml")
        assert_one_error_line(proc, 2, f"port {port} is in use (a server listens there)", "grpc_port")
        assert time.monotonic() - started < 30  # before Ray's start-up (a few seconds at least)


def test_operator_without_a_kubeconfig_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "none"), "HOME": str(tmp_path), "COLUMNS": "250"}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    proc = subprocess.run([sys.executable, "-c", "from recserve.cli import main; main()", "operator", "run",
                           "--namespace", "shop"], capture_output=True, text=True, timeout=120, env=env)
    assert_one_error_line(proc, 2, "no Kubernetes credentials", "KUBECONFIG")
    assert len(proc.stderr.splitlines()) == 1


def test_build_for_onnxruntime_trt_notes_what_tensorrt_skips_and_succeeds(trained, tmp_path: Path) -> None:
    model, _ = trained
    recipe = tmp_path / "int4.yaml"
    recipe.write_text("stages: [{type: embeddings, bits: 4}]\ngate: {min_distinct_score_ratio: null}\n")
    assert recserve("compress", model, "--recipe", recipe, "--out", tmp_path / "c", "--no-speed").returncode == 0
    proc = recserve("build", tmp_path / "c", "--name", "ranker", "--repository", tmp_path / "repo",
                    "--target", "onnxruntime-trt")
    assert proc.returncode == 0, proc.stderr
    assert "note:" in proc.stderr and "UINT8" in proc.stderr and "error:" not in proc.stderr
    config = (tmp_path / "repo" / "ranker" / "config.pbtxt").read_text()
    assert "KIND_GPU" in config
    # a TensorRT version cannot join ONNX ones (one platform per Triton model): refused before any engine build
    proc = recserve("build", tmp_path / "c", "--name", "ranker", "--repository", tmp_path / "repo", "--target", "tensorrt")
    assert_one_error_line(proc, 2, "one platform", "--name (e.g. ranker_trt)")
    assert (tmp_path / "repo" / "ranker" / "config.pbtxt").read_text() == config
    assert sorted(p.name for p in (tmp_path / "repo" / "ranker").iterdir()) == ["1", "config.pbtxt"]
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    assert_one_error_line(recserve("build", tmp_path / "c", "--name", "ranker", "--repository", blocked), 2,
                          "is a file, not a directory")


def test_version() -> None:
    proc = recserve("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("recserve 0.")


def test_train_out_must_be_new_or_empty(trained, tmp_path: Path) -> None:
    model, _ = trained
    before = {p.name: p.stat().st_mtime_ns for p in model.iterdir()}
    proc = recserve("train", "--data", TINY, "--out", model, "--epochs", "1")
    assert_one_error_line(proc, 2, "not empty", "--force")
    assert {p.name: p.stat().st_mtime_ns for p in model.iterdir()} == before
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep")
    proc = recserve("train", "--data", TINY, "--out", notes, "--epochs", "1", "--force")
    assert_one_error_line(proc, 2, "did not write (mine.txt)")
    assert sorted(p.name for p in notes.iterdir()) == ["mine.txt"]


def _bad_recipe(tmp: Path) -> list[str]:
    (tmp / "bad.yaml").write_text("stages:\n  - type: prune\n    sparsity: 1.5\n")
    return ["compress", str(tmp), "--recipe", str(tmp / "bad.yaml"), "--out", str(tmp / "out")]


def _not_onnx(tmp: Path) -> list[str]:
    (tmp / "fp16.yaml").write_text(FP16)
    (tmp / "model.onnx").write_text("definitely not protobuf\n")
    return ["compress", str(tmp / "model.onnx"), "--recipe", str(tmp / "fp16.yaml"), "--out", str(tmp / "out"),
            "--data", TINY]


def _route_without_triton_repo(tmp: Path) -> list[str]:
    (tmp / "router.yaml").write_text("triton_url: 127.0.0.1:8001\nmodels:\n  ranker:\n    rankers:\n"
                                     "      - {triton_model: ranker, edge_model: m.onnx}\n"
                                     "    catalog: catalog\n    preprocessing: p.json\n")
    return ["route", "--config", str(tmp / "router.yaml"), "--triton-repo", str(tmp / "no-repo")]


def _route_with_missing_files(tmp: Path) -> list[str]:
    (tmp / "router.yaml").write_text("models:\n  ranker:\n    rankers:\n      - {triton_model: ranker, edge_model: m.onnx}\n"
                                     "    catalog: catalog\n    preprocessing: p.json\n")
    return ["route", "--config", str(tmp / "router.yaml")]


MISTAKES = {
    "missing-recipe": (lambda tmp: ["compress", str(tmp), "--recipe", str(tmp / "nope.yaml"), "--out", str(tmp / "o")],
                       ["cannot read recipe", "nope.yaml"]),
    "bad-recipe": (_bad_recipe, ["bad.yaml", "stages.0.prune.sparsity"]),
    "not-onnx": (_not_onnx, ["not a valid ONNX model"]),
    "unknown-data-kind": (lambda tmp: ["train", "--data", "parquet:/x", "--out", str(tmp / "o")],
                          ["unknown kind 'parquet'", "synthetic[:ROWS]"]),
    "missing-model": (lambda tmp: ["compress", str(tmp / "nothing"), "--recipe", str(ROOT / "recipes/ranker-fp16.yaml"),
                                   "--out", str(tmp / "o")], ["does not exist"]),
    "route-missing-triton-repo": (_route_without_triton_repo, ["--triton-repo", "no-repo", "no such directory"]),
    "route-missing-edge-model": (_route_with_missing_files, ["not found", "rankers[0].edge_model", "m.onnx",
                                                             "models.ranker.catalog"]),
    "compress-without-budget-or-recipe": (lambda tmp: ["compress", str(tmp), "--out", str(tmp / "o")],
                                          ["--max-auc-loss", "--recipe"]),
    "bad-time-budget": (lambda tmp: ["compress", str(tmp), "--out", str(tmp / "o"), "--max-auc-loss", "0.01",
                                     "--time-budget", "soon"], ["--time-budget 'soon'", "20m"]),
    "objective-with-fixed-stages": (lambda tmp: ["compress", str(tmp), "--out", str(tmp / "o"), "--recipe",
                                                 str(ROOT / "recipes/ranker-fp16.yaml"), "--objective", "size"],
                                    ["--objective", "fixed stages"]),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_user_mistakes_are_one_error_line(case: str, tmp_path: Path) -> None:
    make_args, needles = MISTAKES[case]
    proc = recserve(*make_args(tmp_path))
    assert_one_error_line(proc, 2, *needles)
    assert not (tmp_path / "o").exists() and not (tmp_path / "out").exists()
