"""The compression recipe users write (YAML), validated with pydantic."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from recserve.converters.distill import DistillStage
from recserve.converters.embeddings import EmbeddingStage
from recserve.converters.lowrank import LowRankStage
from recserve.converters.prune import PruneStage
from recserve.converters.quantize import QuantizeStage
from recserve.errors import ConfigError
from recserve.specs import read_mapping, read_text, validate

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


class Recipe(BaseModel):
    """Ordered stages, the evaluation data and the gate."""

    model_config = ConfigDict(extra="forbid")
    name: str = "recipe"
    description: str = ""
    data: str | None = Field(None, description="dataset spec; `--data` overrides it")
    seed: int = 0
    stages: list[Stage] = Field(min_length=1)
    gate: Gate = Field(default_factory=Gate)


def parse_recipe(text: str, source: str = "recipe") -> Recipe:
    what = "a recipe is a YAML mapping with 'stages' (and optionally 'gate', 'data')"
    raw = read_mapping(text, source, what)
    if not raw:
        raise ConfigError(f"{source}: {what}")
    stages = raw.get("stages")
    for i, stage in enumerate(stages if isinstance(stages, list) else []):
        kind = stage.get("type") if isinstance(stage, dict) else None
        if kind not in STAGE_TYPES:
            raise ConfigError(f"{source}: stages.{i}: unknown stage type {kind!r}; use one of {', '.join(STAGE_TYPES)}")
    return validate(Recipe, raw, source)


def load_recipe(path: Path) -> Recipe:
    text = read_text(path, "recipe", "pass a recipe such as recipes/ranker-8x.yaml")
    return parse_recipe(text, str(path))
