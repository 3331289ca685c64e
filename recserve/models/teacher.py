"""``recserve train --teacher DIR``: a ranker trained on a teacher's soft targets (knowledge distillation) as well as
the labels, in one process or on Ray Train, from data in memory or streamed from shards.

The teacher is a ``recserve train`` output: its ``preprocessing.json`` is reused (the student reads the same
inputs), and its ONNX graph gives the logits, run where the rows are made: beside each block in the shard
readers when streaming (:class:`WithTeacher`), so no process holds the teacher's logits for every row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recserve.converters.metrics import logit_of
from recserve.errors import ConfigError


@dataclass
class Teacher:
    directory: Path
    graph: bytes
    """The teacher's model.onnx (a ranker: ``sparse``, ``dense`` -> ``score``)."""
    data_spec: str

    @property
    def preprocessing(self) -> Path:
        return self.directory / "preprocessing.json"


def load_teacher(directory: Path) -> Teacher:
    """A ``recserve train`` ranker directory as a teacher; ConfigError when it is not one."""
    directory = Path(directory)
    files = [directory / n for n in ("model.onnx", "model.json", "preprocessing.json")]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"--teacher {directory}: no {', '.join(missing)} there; pass a `recserve train` output "
                          "directory (a ranker)")
    try:
        meta = json.loads(files[1].read_text())
    except ValueError as e:
        raise ConfigError(f"--teacher {directory}: model.json is not JSON ({e}); pass a `recserve train` output") from e
    if meta.get("kind") != "ranker":
        raise ConfigError(f"--teacher {directory}: a {meta.get('kind')!r} model; a ranker's student needs a ranker "
                          "as its teacher")
    return Teacher(directory, files[0].read_bytes(), str(meta.get("data_spec", "")))


class TeacherScores:
    """The teacher's logits for rows (ONNX Runtime, one thread; the session is made where it is used)."""

    def __init__(self, graph: bytes, threads: int = 1):
        self.graph, self.threads, self._session = graph, threads, None

    def __getstate__(self) -> dict:
        return {"graph": self.graph, "threads": self.threads, "_session": None}

    def logits(self, sparse: np.ndarray, dense: np.ndarray) -> np.ndarray:
        from recserve.converters.evaluate import predict
        from recserve.models.export import RANKER_OUTPUTS
        from recserve.onnxrt import session

        if self._session is None:
            self._session = session(self.graph, self.threads)
        (p,) = predict(self._session, {"sparse": sparse, "dense": dense}, [RANKER_OUTPUTS[0]])
        return logit_of(np.asarray(p).ravel()).astype(np.float32)


class WithTeacher:
    """A shard encoder whose rows also carry the teacher's logits (a ``teacher`` column)."""

    def __init__(self, encoder, graph: bytes):
        self.encoder, self.scores = encoder, TeacherScores(graph)

    def encoded(self, path: Path, shard: int):
        for arrays in self.encoder.encoded(path, shard):
            yield arrays | {"teacher": self.scores.logits(arrays["sparse"], arrays["dense"])}
