"""Shared helpers and fixtures of the Triton integration tests (``tests/integration/test_triton*.py``).

Import what a module needs (``from triton_fixtures import ...``). Models are tiny (6000 synthetic rows,
300 users, 500 items, 8-wide embeddings, one epoch) and trained once per test session: the trained
directories are memoized here, so importing the fixture into several modules does not train twice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from recserve.data import load_dataset
from recserve.data.schema import Dataset, load_preprocessing
from recserve.triton.features import read_columns
from recserve.triton.server import EmbeddedTriton, ServerSettings

SPEC = "synthetic:6000,users=300,items=500"
ROOT = Path(__file__).resolve().parents[2]
UNKNOWN_TOKEN = "never-seen-token"


@dataclass(frozen=True)
class TrainedModels:
    ranker: Path
    """A `recserve train` directory: the ranker served as version 1."""
    ranker_b: Path
    """Same data and architecture, other weights: a second version with the same signature."""
    two_tower: Path


_TRAINED: dict[str, TrainedModels] = {}


def trained_models(tmp_path_factory: pytest.TempPathFactory) -> TrainedModels:
    if "models" not in _TRAINED:
        from recserve.models.pipeline import train_model

        base = tmp_path_factory.mktemp("triton-models")
        common = dict(epochs=1, embedding_dim=8, threads=1, seed=0)
        train_model(SPEC, "ranker", base / "ranker", **common)
        train_model(SPEC, "ranker", base / "ranker_b", learning_rate=2e-2, **common)
        train_model(SPEC, "two-tower", base / "two_tower", **common)
        _TRAINED["models"] = TrainedModels(base / "ranker", base / "ranker_b", base / "two_tower")
    return _TRAINED["models"]


@pytest.fixture(scope="session")
def triton_models(tmp_path_factory: pytest.TempPathFactory) -> TrainedModels:
    return trained_models(tmp_path_factory)


_DATA: dict[str, Dataset] = {}


@pytest.fixture(scope="session")
def ranker_data(triton_models: TrainedModels) -> Dataset:
    """The dataset, id-mapped with the served ranker's vocabularies."""
    if "ranker" not in _DATA:
        _DATA["ranker"] = load_dataset(SPEC, preprocessing=triton_models.ranker / "preprocessing.json")
    return _DATA["ranker"]


@pytest.fixture(scope="session")
def two_tower_data(triton_models: TrainedModels) -> Dataset:
    """The dataset, id-mapped with the two-tower retriever's vocabularies."""
    if "two_tower" not in _DATA:
        _DATA["two_tower"] = load_dataset(SPEC, preprocessing=triton_models.two_tower / "preprocessing.json")
    return _DATA["two_tower"]


def settings(repository: Path, **kw) -> ServerSettings:
    return ServerSettings.on_free_ports(Path(repository), **kw)


def start_triton(repository: Path, **kw) -> EmbeddedTriton:
    return EmbeddedTriton(settings(repository, **kw)).start()


def serving_repo(base: Path, models: TrainedModels, queue_delay_us: int, candidates: int) -> Path:
    """A repository with everything recserve serves: the ranker (dynamic batching with ``queue_delay_us``), the
    retrieval models and the ensembles."""
    from recserve.converters.build import build, load_profile
    from recserve.triton.ensembles import write_ensembles
    from recserve.triton.retrieval import build_retrieval

    build(models.ranker, "ranker", "onnxruntime", base, load_profile(None, {"max_queue_delay_us": queue_delay_us}))
    build_retrieval(models.two_tower, models.ranker, None, base, candidates=candidates)
    write_ensembles(base)
    return base


def running_triton(repository: Path) -> Iterator[EmbeddedTriton]:
    """A module fixture's body: Triton on ``repository`` for the module, stopped after it."""
    srv = start_triton(repository)
    try:
        yield srv
    finally:
        srv.stop()


def ort_run(onnx_path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def raw_ranker_rows(preprocessing: Path, sparse: np.ndarray, dense: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Model-input rows back to what a client sends: vocabulary tokens and untransformed numbers.

    Id 0 (OOV) becomes a token no vocabulary holds.
    """
    vocabs, transforms = load_preprocessing(preprocessing)
    names = read_columns(preprocessing)["ranking_sparse"]
    raw_sparse = np.empty(sparse.shape, dtype=object)
    for j, name in enumerate(names):
        tokens = vocabs[name].tokens
        raw_sparse[:, j] = [tokens[i - 1] if i > 0 else UNKNOWN_TOKEN for i in sparse[:, j]]
    raw_dense = np.zeros(dense.shape, dtype=np.float64)
    for j, t in enumerate(transforms):
        x = dense[:, j].astype(np.float64) * (t.std or 1.0) + t.mean
        raw_dense[:, j] = np.expm1(x) if t.kind == "log1p" else x
    return raw_sparse, raw_dense.astype(np.float32)


def strings(values) -> np.ndarray:
    return np.array(values, dtype=object)


def tritonserver_pids(grpc_port: int) -> list[int]:
    """Live tritonserver processes started with ``--grpc-port=grpc_port`` (zombies excluded)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"tritonserver") and f"--grpc-port={grpc_port}".encode() in cmd and state != "Z":
            found.append(int(entry))
    return found


def kill_tritonservers(grpc_port: int, grace: float = 15.0) -> None:
    """End the tritonserver this test started on ``grpc_port`` (by pid: SIGINT to its group, then SIGKILL)."""
    pids = tritonserver_pids(grpc_port)
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGINT)  # started with start_new_session: its group is its own
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while tritonserver_pids(grpc_port) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in tritonserver_pids(grpc_port):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def http_ready(http_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def cli_env() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb"}


def cli_args(*args: str | Path) -> list[str]:
    return [sys.executable, "-c", "from recserve.cli import main; main()", *map(str, args)]


def recserve(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cli_args(*args), capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=cli_env())


def parse_printed(stdout: str, name: str) -> np.ndarray:
    """The array ``recserve infer`` printed as ``NAME [shape]: [values]``."""
    import ast

    line = next(line for line in stdout.splitlines() if line.startswith(f"{name} ["))
    return np.array(ast.literal_eval(line.split(": ", 1)[1]))
