"""Knowledge distillation of a ranker into a smaller student ranker.

The teacher is the current model (its PyTorch module, or the ONNX graph run by onnxruntime for a
plain ONNX input); the student is a recserve DCN-v2 ranker of the size the recipe gives, trained on
the training rows with temperature-softened teacher scores plus the labels.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

import numpy as np
import torch
from onnx import numpy_helper
from pydantic import BaseModel, ConfigDict, Field

from recserve.converters.evaluate import predict, session
from recserve.converters.graph import embedding_gathers, initializers
from recserve.converters.metrics import logit_of
from recserve.converters.stage import ModelState, StageContext, StageSpec, train_on_ray
from recserve.data.schema import RankingData
from recserve.data.splits import carve_validation
from recserve.errors import StageError
from recserve.models.artifact import build_module
from recserve.models.ranker import Ranker, RankerConfig
from recserve.models.train import Distillation, fit_ranker, predict_logits


class StudentSpec(BaseModel):
    """Architecture of the student ranker."""

    model_config = ConfigDict(extra="forbid")
    embedding_dim: int = Field(16, ge=1)
    cross_layers: int = Field(1, ge=0)
    cross_rank: int | None = Field(None, ge=1)
    bottom_mlp: list[int] = Field(default_factory=lambda: [32])
    top_mlp: list[int] = Field(default_factory=lambda: [128, 64])


class DistillStage(StageSpec):
    """Train a smaller student on the teacher's softened scores and the labels."""

    type: Literal["distill"] = "distill"
    student: StudentSpec = Field(default_factory=StudentSpec)
    temperature: float = Field(2.0, gt=0.0)
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the label loss; 1 - alpha goes to the teacher")
    loss: Literal["bce", "mse"] = Field("bce", description="the teacher part: BCE on softened scores, or MSE of logits")
    select: Literal["auc", "agreement"] = Field(
        "auc", description="best epoch by validation AUC, or by agreement with the teacher on a slice of the training "
        "rows the student does not learn from (the validation split is then not read at all: it stays an unbiased "
        "judge of the student)")
    epochs: int = Field(4, ge=1, description="at most this many epochs; the best on validation is kept")
    patience: int | None = Field(None, ge=1, description="stop after this many epochs without a better validation AUC")
    learning_rate: float = Field(2e-3, gt=0.0)
    decay_on_plateau: bool = Field(False, description="halve the learning rate after an epoch without improvement")
    init_embeddings: bool = Field(False, description="start the student's embedding table from the teacher's "
                                  "(its leading principal components when the student's is narrower)")
    workers: int | None = Field(None, ge=1, description="train the student on Ray Train with this many data-parallel "
                                "workers (a local Ray, or the cluster RAY_ADDRESS names); default: in this process")

    def apply(self, state: ModelState, ctx: StageContext) -> tuple[ModelState, dict[str, Any]]:
        if state.kind != "ranker":
            raise StageError("distill: only rankers can be distilled for now; drop this stage for a two-tower model")
        train, validation = ctx.recserve_rows("distill")
        agreement = None
        if self.select == "agreement":
            train, stopping = split_stopping_rows(train, ctx.train.seed)
            agreement, validation = teacher_logits(state, ctx, stopping)[0], stopping
        teacher, source = teacher_logits(state, ctx, train)
        config = RankerConfig(cardinalities=[f.cardinality for f in train.sparse_features],
                              num_dense=len(train.dense_names), **self.student.model_dump())
        student = build_module("ranker", config, seed=ctx.train.seed)
        details: dict[str, Any] = {}
        if self.init_embeddings:
            details["embeddings_from_teacher"] = init_from_teacher(student, teacher_table(state))
        settings = replace(ctx.train, epochs=self.epochs, learning_rate=self.learning_rate, patience=self.patience,
                           decay_on_plateau=self.decay_on_plateau)
        distill = Distillation(teacher, self.temperature, self.alpha, self.loss, agreement)
        if self.workers is None:
            history = fit_ranker(student, train, settings, validation=validation, label="distill", distill=distill)
        else:
            history = train_on_ray(student, train, validation, settings, self.workers, distill)
        return replace(state, module=student).with_module(student, ctx.data), {
            "teacher": source, "student": config.to_json(), "training": history, **details}


STOPPING_FRACTION = 0.1


def split_stopping_rows(rows: RankingData, seed: int) -> tuple[RankingData, RankingData]:
    """(rows to learn from, rows to pick the best epoch on by agreement with the teacher): no labels needed.

    Picking the epoch that agrees most with the teacher on the validation rows would fit the student
    to the teacher's quirks on exactly the rows that then judge it: its validation loss would read
    closer to zero than its test loss (measured: +0.03% apart on average). A slice of the training
    rows keeps the validation split untouched.
    """
    stop = carve_validation(len(rows), STOPPING_FRACTION, seed + 1)
    keep = np.ones(len(rows), dtype=bool)
    keep[stop] = False
    return rows.take(np.flatnonzero(keep)), rows.take(stop)


def teacher_table(state: ModelState) -> np.ndarray | None:
    """The teacher's embedding table (rows in the student's layout), or None when it has no single one."""
    embedding = getattr(state.module, "embedding", None)
    if isinstance(embedding, torch.nn.Embedding):
        return embedding.weight.detach().numpy()
    tables = [t for t in (initializers(state.graph)[g.input[0]] for g in embedding_gathers(state.graph))]
    return numpy_helper.to_array(tables[0]).astype(np.float32) if len(tables) == 1 else None


def init_from_teacher(student: Ranker, table: np.ndarray | None) -> str:
    """Copy the teacher's rows into the student's table (projected on their leading principal axes when
    the student is narrower); says what was done."""
    target = student.embedding.weight
    if table is None or table.shape[0] != target.shape[0]:
        return "no: the teacher has no embedding table with the student's rows"
    d = target.shape[1]
    if table.shape[1] > d:
        centered = table - table.mean(axis=0, keepdims=True)
        _, _, vt = np.linalg.svd(centered, full_matrices=False)
        table = table @ vt[:d].T
        how = f"projected {vt.shape[1]} -> {d} dimensions (PCA)"
    elif table.shape[1] < d:
        return "no: the teacher's table is narrower than the student's"
    else:
        how = "copied"
    with torch.no_grad():
        target.copy_(torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32)))
    return how


def teacher_logits(state: ModelState, ctx: StageContext, rows: RankingData) -> tuple[np.ndarray, str]:
    """The teacher's logits on ``rows`` (float32) and where they came from (its module or its graph)."""
    if state.module is not None:
        return predict_logits(state.module, rows), "pytorch"
    (p,) = predict(session(state.graph, ctx.train.threads), rows.inputs(), [ctx.scoring.score_output])
    p = p.ravel().astype(np.float64)
    return (p if ctx.scoring.logits else logit_of(p)).astype(np.float32), "onnxruntime"
