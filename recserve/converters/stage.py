"""The contract every compression stage keeps: model state in, model state and details out.

A stage's spec is the pydantic model users write in a recipe; ``apply`` does the work. The state
always holds the servable ONNX graph; it also holds the PyTorch module while one backs the graph,
so that training stages (fine-tune, distillation) can run. Graph-only stages drop the module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import onnx
from pydantic import BaseModel, ConfigDict
from torch import nn

from recserve.converters.evaluate import HeldOut, Scoring, held_out
from recserve.data.schema import Dataset, RankingData, Rows
from recserve.errors import StageError
from recserve.models.artifact import sample_feed
from recserve.models.export import export_onnx
from recserve.models.train import TrainSettings, fit_ranker, fit_two_tower


@dataclass
class ModelState:
    kind: str
    """``ranker`` or ``two-tower``."""
    graph: onnx.ModelProto
    module: nn.Module | None = None
    """The PyTorch model the graph was exported from, while there is one."""

    def with_module(self, module: nn.Module, data: Dataset) -> ModelState:
        return replace(self, module=module, graph=export_onnx(module, self.kind, sample_feed(self.kind, data)))

    def with_graph(self, graph: onnx.ModelProto) -> ModelState:
        return replace(self, graph=graph, module=None)


@dataclass
class StageContext:
    """What every stage may use: the data's splits, training settings and how models are scored.

    Stages learn from the fit rows and make every choice (best epoch, kept layers) on the
    validation split; the test split is not theirs to see.
    """

    data: Dataset
    scoring: Scoring
    train: TrainSettings = field(default_factory=TrainSettings)

    @cached_property
    def validation(self) -> HeldOut:
        return held_out(self.data, self.scoring.kind, "validation")

    @cached_property
    def fit(self) -> Rows:
        """Ranking rows to learn and calibrate from (training rows without the validation rows)."""
        return self.data.ranking_fit()

    def recserve_rows(self, what: str) -> tuple[RankingData, RankingData]:
        """(fit, validation) rows in recserve's feature layout; StageError for a model of the user's own."""
        if not isinstance(self.fit, RankingData):
            raise StageError(f"{what} trains a recserve ranker, which needs recserve's sparse/dense features; with "
                             "--data tensors:PATH only post-training stages run (quantize, embeddings, low_rank, prune)")
        return self.fit, self.validation.rows

    def fine_tune(self, state: ModelState, epochs: int, label: str, workers: int | None = None) -> dict[str, Any]:
        """Train the state's module for ``epochs`` more epochs (no-op at 0); returns the history.

        Fine-tuning repairs a trained model: a quarter of the training learning rate, so it does not
        undo the best-epoch choice of the original training; the best epoch is kept on validation.
        ``workers``: a ranker trains on Ray Train with that many workers (recserve.models.distributed).
        """
        if epochs <= 0 or state.module is None:
            return {}
        settings = replace(self.train, epochs=epochs, learning_rate=self.train.learning_rate / 4)
        if state.kind == "ranker":
            fit, validation = self.recserve_rows("fine-tuning")
            if workers is None:
                return fit_ranker(state.module, fit, settings, validation=validation, label=label)
            return train_on_ray(state.module, fit, validation, settings, workers)
        return fit_two_tower(state.module, self.data.retrieval, settings, label=label)


def train_on_ray(module, fit: RankingData, validation: RankingData, settings: TrainSettings, workers: int,
                 distill=None) -> dict[str, Any]:
    """Train ``module`` in place on Ray Train (each worker a copy of it, pruning masks included; ``distill``: a
    :class:`recserve.models.train.Distillation`); the best epoch's weights come back into it. Checkpoints live
    in a temporary directory for the stage."""
    import tempfile

    from recserve.models.distributed import RaySettings, fit_ranker_ray

    with tempfile.TemporaryDirectory(prefix="recserve-stage-") as storage:
        best, history = fit_ranker_ray(None, fit, validation, settings, RaySettings(workers=workers), Path(storage),
                                       distill=distill, module=module)
    module.load_state_dict(best)
    module.eval()
    return history


class StageSpec(BaseModel, ABC):
    """Base of every stage in a recipe."""

    model_config = ConfigDict(extra="forbid")

    @abstractmethod
    def apply(self, state: ModelState, ctx: StageContext) -> tuple[ModelState, dict[str, Any]]:
        """Return the new state and what the stage did (for the report)."""
