"""The compression recipe users write (YAML), validated with pydantic."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from recserve.converters.distill import DistillStage, StudentSpec
from recserve.converters.embeddings import EmbeddingStage
from recserve.converters.lowrank import LowRankStage
from recserve.converters.prune import PruneStage
from recserve.converters.quantize import QuantizeStage
from recserve.specs import parse_staged, read_text

Stage = Annotated[
    PruneStage | LowRankStage | DistillStage | QuantizeStage | EmbeddingStage,
    Field(discriminator="type"),
]
STAGE_TYPES = ("prune", "low_rank", "distill", "quantize", "embeddings")


class Gate(BaseModel):
    """Limits the compressed model must meet, against the uncompressed baseline on held-out data."""

    model_config = ConfigDict(extra="forbid")
    max_relative_auc_loss: float | None = Field(None, ge=0.0, description="(baseline AUC - AUC) / baseline AUC")
    max_relative_recall_loss: float | None = Field(None, ge=0.0, description="same for recall@k (retrievers)")
    max_logloss_increase: float | None = Field(None, ge=0.0, description="absolute logloss increase (rankers)")
    min_size_ratio: float | None = Field(None, gt=0.0, description="baseline bytes / compressed bytes")
    min_throughput_ratio: float | None = Field(None, gt=0.0, description="compressed / baseline rows/s at batch 256")
    min_distinct_score_ratio: float | None = Field(
        0.5, ge=0.0, le=1.0, description="distinct held-out scores / distinct held-out inputs: a model whose scores "
        "collapse onto a few values cannot rank, whatever its AUC")


class DistillSettings(BaseModel):
    """How the search trains each student. By default a student learns only the teacher's scores, starts
    from the teacher's embedding table, and keeps the epoch that agrees most with the teacher on a slice
    of the training rows it does not learn from: a faithful copy, and the validation split is not read
    while it trains, so its validation loss predicts its test loss without bias and with a small error."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(40, ge=1, description="a ceiling: the best validation epoch is kept")
    patience: int = Field(4, ge=1, description="stop after this many epochs without improvement (each halves the rate)")
    learning_rate: float = Field(5e-3, gt=0.0)
    temperature: float = Field(1.0, gt=0.0)
    alpha: float = Field(0.0, ge=0.0, le=1.0, description="weight of the labels (the rest: the teacher's scores)")
    loss: Literal["bce", "mse"] = "bce"
    select: Literal["agreement", "auc"] = "agreement"
    init_embeddings: bool = True
    workers: int | None = Field(None, ge=1, description="train each student on Ray Train with this many workers "
                                "(a student started finishes its epochs even past the time budget)")


class SearchSpec(BaseModel):
    """A budgeted search instead of fixed stages: the best model that keeps the gate's quality budget."""

    model_config = ConfigDict(extra="forbid")
    objective: Literal["size", "throughput"] = Field("size", description="what the chosen model is best at")
    time_budget_s: float = Field(1200.0, gt=0.0, description="stop starting new candidates after this many seconds")
    confidence: float = Field(0.95, ge=0.5, lt=1.0, description="accept a candidate when the gate on a test split "
                              "of the test split's size passes with at least this probability, judged from its "
                              "validation loss and the standard errors of both splits")
    students: Literal["auto"] | list[StudentSpec] = Field(
        "auto", description="distillation students to try: 'auto' (a ladder sized from the teacher) or a list; [] none")
    distill: DistillSettings = Field(default_factory=DistillSettings)
    embedding_bits: list[Literal[4, 8]] = Field(default_factory=lambda: [4, 8], description="widths tried, narrowest first")
    mixed_dimension: bool = Field(True, description="try fewer dimensions for rare rows, and one shared row for the rarest")
    quantize: list[Literal["int8_static", "fp16"]] = Field(
        default_factory=lambda: ["int8_static", "fp16"], description="dense-layer precisions tried, in order")
    low_rank_energies: list[float] = Field(default_factory=lambda: [0.9, 0.97],
                                           description="truncated-SVD energies tried on the dense layers (no fine-tune)")
    calibration_rows: int = Field(4096, ge=1)


class Recipe(BaseModel):
    """Ordered stages, the evaluation data and the gate."""

    model_config = ConfigDict(extra="forbid")
    name: str = "recipe"
    description: str = ""
    data: str | None = Field(None, description="dataset spec; `--data` overrides it")
    seed: int = 0
    stages: list[Stage] = Field(default_factory=list)
    search: SearchSpec | None = None
    gate: Gate = Field(default_factory=Gate)

    @model_validator(mode="after")
    def _stages_or_search(self) -> Recipe:
        if bool(self.stages) == (self.search is not None):
            raise ValueError("a recipe has either 'stages' (run as given) or 'search' (stages found for the gate's "
                             "budget), not both and not neither")
        if self.search is not None and self.gate.max_relative_auc_loss is None:
            raise ValueError("a search needs a quality budget: set gate.max_relative_auc_loss (or --max-auc-loss)")
        return self


def parse_recipe(text: str, source: str = "recipe") -> Recipe:
    return parse_staged(Recipe, text, source, "a recipe is a YAML mapping with 'stages' or 'search' (and optionally "
                        "'gate', 'data')", STAGE_TYPES)


def load_recipe(path: Path) -> Recipe:
    text = read_text(path, "recipe", "pass a recipe such as recipes/ranker-8x.yaml")
    return parse_recipe(text, str(path))
