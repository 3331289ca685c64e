"""Knowledge distillation of a ranker into a smaller student ranker.

The teacher is the current model (its PyTorch module, or the ONNX graph run by onnxruntime for a
plain ONNX input); the student is a recserve DCN-v2 ranker of the size the recipe gives, trained on
the training rows with temperature-softened teacher scores plus the labels.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from recserve.converters.evaluate import predict, session
from recserve.converters.stage import ModelState, StageContext, StageSpec
from recserve.errors import StageError
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
    epochs: int = Field(4, ge=1)
    learning_rate: float = Field(2e-3, gt=0.0)

    def apply(self, state: ModelState, ctx: StageContext) -> tuple[ModelState, dict[str, Any]]:
        if state.kind != "ranker":
            raise StageError("distill: only rankers can be distilled for now; drop this stage for a two-tower model")
        train = ctx.data.ranking_train
        if state.module is not None:
            teacher = predict_logits(state.module, train)
            source = "pytorch"
        else:
            (p,) = predict(session(state.graph, ctx.train.threads), train.inputs())
            p = np.clip(p.ravel().astype(np.float64), 1e-7, 1 - 1e-7)
            teacher = np.log(p / (1 - p)).astype(np.float32)
            source = "onnxruntime"
        config = RankerConfig(cardinalities=[f.cardinality for f in train.sparse_features],
                              num_dense=len(train.dense_names), **self.student.model_dump())
        student = Ranker(config)
        settings = replace(ctx.train, epochs=self.epochs, learning_rate=self.learning_rate)
        history = fit_ranker(student, train, settings, label="distill",
                             distill=Distillation(teacher, self.temperature, self.alpha))
        return replace(state, module=student).with_module(student, ctx.data), {
            "teacher": source, "student": config.to_json(), "training": history}
