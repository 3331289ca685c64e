"""``recserve train --workers N`` on real Ray Train, run as a user runs it: two workers learn what one does; a
worker SIGKILLed mid-epoch is survived (the run goes on from the last epoch's checkpoint, and the model's
history has every epoch exactly once); a run killed whole continues with ``--resume``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DATA = "synthetic:60000"


def command(out: Path, *extra: str, epochs: int = 3) -> list[str]:
    return [sys.executable, "-c", "from recserve.cli import main; main()", "train", "--data", DATA, "--out", str(out),
            "--epochs", str(epochs), *extra]


def env() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "80", "NO_COLOR": "1", "RAY_ADDRESS": ""}


def run(out: Path, *extra: str, epochs: int = 3) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(out, *extra, epochs=epochs), capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env=env())
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


def trained(out: Path) -> dict:
    return json.loads((out / "model.json").read_text())


def checkpoints(out: Path) -> list[Path]:
    run_dir = out.parent / f".{out.name}.ray-train" / "run"
    return sorted(run_dir.glob("checkpoint_*")) if run_dir.is_dir() else []


class Run:
    """``recserve train`` in the background, its output (stdout and stderr) read as it comes."""

    def __init__(self, out: Path, *extra: str, epochs: int, session: bool = False):
        import threading

        self.proc = subprocess.Popen(command(out, *extra, epochs=epochs), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env(),
                                     start_new_session=session)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, text: str, timeout: float = 300) -> None:
        """Until a line holding ``text`` is printed (an epoch line is printed just before its checkpoint is
        reported; the caller gives it a moment more)."""
        end = time.monotonic() + timeout
        while not any(text in ln for ln in list(self.lines)):
            assert self.proc.poll() is None, "".join(self.lines)[-3000:]
            assert time.monotonic() < end, f"no {text!r} line"
            time.sleep(0.1)

    def finish(self, timeout: float = 900) -> str:
        self.proc.wait(timeout)
        self.reader.join(10)
        return "".join(self.lines)


def registered_checkpoints(out: Path) -> int:
    """Checkpoints the Ray Train controller has registered (its snapshot file): what a restart resumes from. A
    checkpoint directory on disk that the controller has not registered yet is not (a worker killed then makes
    the group start over: epoch 1 again)."""
    snapshot = out.parent / f".{out.name}.ray-train" / "run" / "checkpoint_manager_snapshot.json"
    try:
        return len(json.loads(snapshot.read_text()).get("checkpoint_results", []))
    except (OSError, ValueError):
        return 0


def train_workers() -> list[int]:
    ps = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True)
    return [int(p) for p in ps.stdout.split()]


def epochs_of(out: Path) -> list[int]:
    return [e["epoch"] for e in trained(out)["metrics"]["history"]["epochs"]]


def test_two_workers_learn_what_one_does(tmp_path: Path) -> None:
    one = run(tmp_path / "w1", "--workers", "1")
    two = run(tmp_path / "w2", "--workers", "2")
    auc1, auc2 = (trained(tmp_path / w)["metrics"]["held_out"]["auc"] for w in ("w1", "w2"))
    assert abs(auc2 - auc1) / auc1 <= 0.005, (auc1, auc2)  # measured 0.7545 and 0.7551
    for out, proc, workers in ((tmp_path / "w1", one, 1), (tmp_path / "w2", two, 2)):
        history = trained(out)["metrics"]["history"]
        assert history["workers"] == workers and epochs_of(out) == [1, 2, 3] and history["rows_per_s"] > 0
        lines = [ln for ln in proc.stdout.splitlines() + proc.stderr.splitlines() if "epoch 3/3:" in ln]
        assert len(lines) == 1 and f"on {workers} worker" in lines[0], lines  # one line per epoch for the run
        assert "Reporting training result" not in proc.stdout + proc.stderr


def test_a_worker_killed_mid_epoch_is_survived(tmp_path: Path) -> None:
    out = tmp_path / "model"
    run_ = Run(out, "--workers", "2", epochs=4)
    try:
        run_.wait_for("epoch 1/4:")
        end = time.monotonic() + 60
        while registered_checkpoints(out) < 1:  # the first epoch's checkpoint registered: the kill is mid-epoch 2+
            assert time.monotonic() < end and run_.proc.poll() is None, "".join(run_.lines)[-3000:]
            time.sleep(0.05)
        victims = train_workers()
        assert victims, "no Ray Train worker process found"
        os.kill(victims[-1], signal.SIGKILL)
        text = run_.finish()
    finally:
        if run_.proc.poll() is None:
            run_.proc.kill()
    assert run_.proc.returncode == 0, text[-3000:]
    assert epochs_of(out) == [1, 2, 3, 4] and len(checkpoints(out)) >= 4
    assert 1 <= trained(out)["metrics"]["history"]["best_epoch"] <= 4
    assert sum("epoch 1/4:" in ln for ln in text.splitlines()) == 1, text[-3000:]  # epoch 1 not trained again
    assert "epoch 4/4:" in text
    assert "RayTrainWorker" in text and "died" in text  # the failure happened, and was survived


def test_a_run_killed_whole_goes_on_with_resume(tmp_path: Path) -> None:
    out = tmp_path / "model"
    run_ = Run(out, "--workers", "1", epochs=3, session=True)
    try:
        run_.wait_for("epoch 1/3:")
        end = time.monotonic() + 60
        while registered_checkpoints(out) < 1 and time.monotonic() < end and run_.proc.poll() is None:
            time.sleep(0.05)
    finally:
        os.killpg(run_.proc.pid, signal.SIGKILL)
        run_.finish()
    assert not (out / "model.json").exists() and registered_checkpoints(out) >= 1
    resumed = run(out, "--workers", "1", "--resume")
    assert epochs_of(out) == [1, 2, 3]
    text = resumed.stdout + resumed.stderr
    assert "epoch 1/3:" not in text and "epoch 3/3:" in text, text[-2000:]  # it went on from its checkpoint


def test_what_a_user_can_get_wrong(tmp_path: Path) -> None:
    for extra, needle in ((["--resume"], "add --workers N"), (["--gpu"], "add --workers N"),
                          (["--workers", "1", "--resume"], "no earlier run"),
                          (["--workers", "2", "--model", "two-tower"], "the two-tower retriever trains in one")):
        proc = subprocess.run(command(tmp_path / "x", *extra), capture_output=True, text=True, timeout=300, cwd=ROOT,
                              env=env())
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]


CLI = [sys.executable, "-c", "from recserve.cli import main; main()"]


def cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env())
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


def streamed_like_in_memory(spec: str, tmp_path: Path) -> tuple[Path, float]:
    """Train on ``spec`` streamed (2 workers, 2 epochs) and in memory (one process); the streamed run's fitted
    vocabularies and split sizes are the in-memory reader's, and its held-out AUC within 2%: (its output, AUC)."""
    from recserve.data import load_dataset

    out = tmp_path / "streamed"
    proc = cli("train", "--data", spec, "--out", str(out), "--epochs", "2", "--workers", "2")
    meta = trained(out)
    in_memory = load_dataset(spec)
    saved = json.loads((out / "preprocessing.json").read_text())
    assert {n: v["tokens"] for n, v in saved["vocabularies"].items()} == \
        {n: v.tokens for n, v in in_memory.vocabularies.items()}
    rows = meta["metrics"]["history"]["rows"]
    assert (rows["fit"], rows["validation"], rows["test"]) == (
        len(in_memory.ranking_fit()), len(in_memory.ranking_validation()), len(in_memory.ranking_test))
    assert epochs_of(out) == [1, 2] and meta["metrics"]["history"]["workers"] == 2
    cli("train", "--data", spec, "--out", str(tmp_path / "single"), "--epochs", "2")
    auc, auc1 = (trained(o)["metrics"]["held_out"]["auc"] for o in (out, tmp_path / "single"))
    assert auc > 0.7 and abs(auc - auc1) / auc1 <= 0.02, (auc, auc1)
    assert "Traceback" not in proc.stderr and "execution finished" not in proc.stdout + proc.stderr
    return out, auc


def test_criteo_shards_are_streamed_to_the_workers(tmp_path: Path) -> None:
    """``criteo:DIR`` with --workers: vocabularies fitted in one pass over the shards (the same as the in-memory
    reader's), rows read and encoded by Ray Data as the workers take them, the test rows scored as a stream."""
    cli("write-shards", "--rows", "40000", "--shard-rows", "15000", "--out", str(tmp_path / "shards"),
        "--format", "parquet")
    streamed_like_in_memory(f"criteo:{tmp_path / 'shards'},min_freq=2", tmp_path)


def test_an_interaction_log_is_streamed_to_the_workers(tmp_path: Path) -> None:
    """``interactions:DIR`` with --workers: two passes over the log's shards fit the vocabularies, each user's
    last two interactions and the seen pairs; Ray Data makes each epoch's rows (negatives included) from the
    shards; the model equals in quality the one trained on the same rows in memory. Then a smaller student is
    distilled from it (``--teacher``), streamed the same way: the shard readers add the teacher's logits."""
    cli("write-shards", "--kind", "interactions", "--rows", "30000", "--shard-rows", "12000",
        "--out", str(tmp_path / "s"))
    spec = f"interactions:{tmp_path / 's' / 'log'},meta={tmp_path / 's' / 'item_meta.csv'}"
    out, auc = streamed_like_in_memory(spec, tmp_path)
    student = tmp_path / "student"
    cli("train", "--data", spec, "--out", str(student), "--epochs", "1", "--workers", "2", "--embedding-dim", "4",
        "--teacher", str(out))
    taught = trained(student)["metrics"]
    assert taught["teacher"]["held_out"]["auc"] == pytest.approx(auc, abs=1e-6)  # the same test rows
    assert taught["held_out"]["auc"] > 0.7 and trained(student)["config"]["embedding_dim"] == 4


def test_a_recipes_distill_and_fine_tune_run_on_ray_train(tmp_path: Path) -> None:
    """``workers: 2`` in a recipe's distill stage: the student trains on Ray Train from the teacher's logits, chooses
    its epoch by agreement with the teacher (patience included) and is gated as any student is; a magnitude
    prune then fine-tunes it there too (each worker a copy of the pruned module, masks included). The same
    recipe in one process gives about the same model."""
    cli = [sys.executable, "-c", "from recserve.cli import main; main()"]
    data = "synthetic:40000"
    teacher = tmp_path / "teacher"
    subprocess.run([*cli, "train", "--data", data, "--out", str(teacher), "--epochs", "2"], check=True,
                   capture_output=True, cwd=ROOT, env=env(), timeout=600)
    results = {}
    for workers in (None, 2):
        recipe = tmp_path / f"recipe-{workers}.yaml"
        stage = ["  - type: distill", "    student: {embedding_dim: 16, bottom_mlp: [32], top_mlp: [64]}",
                 "    epochs: 4", "    patience: 2", "    select: agreement", "    alpha: 0.2",
                 "    learning_rate: 0.005"]
        stage += [f"    workers: {workers}"] if workers else []
        stage += ["  - type: prune", "    sparsity: 0.5", "    fine_tune_epochs: 2"]
        stage += [f"    workers: {workers}"] if workers else []
        recipe.write_text("\n".join(["name: ray-distill", "stages:", *stage,
                                     "gate: {max_relative_auc_loss: 0.5}", ""]))
        out = tmp_path / f"student-{workers}"
        proc = subprocess.run([*cli, "compress", str(teacher), "--recipe", str(recipe), "--data", data, "--out",
                               str(out)], capture_output=True, text=True, cwd=ROOT, env=env(), timeout=900)
        assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
        report = json.loads((out / "report.json").read_text())
        results[workers] = report
        assert (out / "model.onnx").exists()
    training = next(s for s in results[2]["stages"] if s["name"] == "distill")["details"]["training"]
    fine_tune = next(s for s in results[2]["stages"] if s["name"] == "prune")["details"]
    assert fine_tune["fine_tune"]["workers"] == 2 and len(fine_tune["fine_tune"]["epochs"]) == 2
    assert 0.45 < fine_tune["sparsity"] < 0.55  # the masks held through the workers' training
    assert training["workers"] == 2 and all("validation_logit_mse" in e for e in training["epochs"])
    assert 1 <= training["best_epoch"] <= 4
    auc = {w: r["result"]["quality"]["auc"] for w, r in results.items()}
    assert abs(auc[2] - auc[None]) / auc[None] <= 0.03, auc  # measured 0.75684 and 0.75687
