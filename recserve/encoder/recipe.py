"""The compression recipe for a text encoder (YAML, validated with pydantic): ordered stages and a gate
judged on retrieval. ``recserve compress ENCODER_DIR --recipe FILE`` reads it; see
``recipes/query-encoder.yaml``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from recserve.encoder.distill import Schedule
from recserve.encoder.quantize import Mode, outlier_ratio_problem
from recserve.specs import parse_staged, read_text

STAGE_TYPES = ("distill", "prune_vocab", "quantize")


class DistillStage(BaseModel):
    """Layer-dropping distillation (``recserve.encoder.distill``): kept layers and epoch chosen on validation."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["distill"] = "distill"
    layers: int = Field(3, ge=1, description="transformer layers the student keeps")
    epochs: int = Field(4, ge=1, description="a ceiling: the best validation epoch is kept")
    learning_rate: float = Field(1e-4, gt=0.0, description="the peak learning rate")
    schedule: Schedule = Field("constant", description="`constant`, or `linear`: warm up over the first 6% of the "
                               "steps, then down to 0 at the last")
    batch_size: int = Field(64, ge=1)
    max_texts: int = Field(30_000, ge=10, description="training texts at most: the tuning queries not "
                                                      "validated on, then titles and 1-4 word spans of titles")
    ranking_weight: float = Field(0.0, ge=0.0, description="weight of the ranking-agreement loss over the teacher's "
                                  "catalog embeddings (0: cosine only); the epoch is then chosen on top-10 agreement")
    temperature: float = Field(0.05, gt=0.0, description="softmax temperature of the ranking-agreement loss")
    token_weight: float = Field(0.0, ge=0.0, description="weight of the token loss: 1 - cosine between the student's "
                                "and the teacher's last hidden state of each token (0: off)")


class PruneVocabStage(BaseModel):
    """The token embedding table cut to the tokens the tuning queries and titles use (``recserve.encoder.vocab``)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["prune_vocab"] = "prune_vocab"


class QuantizeStage(BaseModel):
    """Lower precision (``recserve.encoder.quantize``)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["quantize"] = "quantize"
    mode: Mode = "int8_dynamic"
    calibration_texts: int = Field(512, ge=1, description="int8_static and outlier_ratio: tuning texts the ranges "
                                   "are measured on")
    outlier_ratio: float | None = Field(None, gt=1.0, description="int8_dynamic: input channels whose range is above "
                                        "this times the 99th percentile of their input's channel ranges stay float "
                                        "(none: every channel INT8)")

    @model_validator(mode="after")
    def _outliers_are_dynamic(self) -> QuantizeStage:
        if problem := outlier_ratio_problem(self.mode, self.outlier_ratio):
            raise ValueError(problem)
        return self


Stage = Annotated[DistillStage | PruneVocabStage | QuantizeStage, Field(discriminator="type")]


class EncoderGate(BaseModel):
    """Limits the compressed encoder must meet against the one it came from, on the held-out queries."""

    model_config = ConfigDict(extra="forbid")
    max_relative_ndcg_loss: float | None = Field(None, ge=0.0, description="(teacher NDCG@10 - NDCG@10) / teacher's")
    min_teacher_overlap_at_10: float | None = Field(None, ge=0.0, le=1.0,
                                                    description="share of the teacher's top 10 products kept")
    min_size_ratio: float | None = Field(None, gt=0.0, description="teacher bytes / compressed bytes")
    min_throughput_ratio: float | None = Field(None, gt=0.0, description="compressed / teacher texts/s at batch 64, "
                                                                         "16 tokens")


class EncoderSearch(BaseModel):
    """A budgeted search instead of fixed stages (``recserve.encoder.search``): the cheapest student that keeps
    the gate's NDCG budget on validation queries."""

    model_config = ConfigDict(extra="forbid")
    objective: Literal["size", "throughput"] = "size"
    students: list[int] = Field(default_factory=lambda: [2, 3, 4], min_length=1,
                                description="transformer layers of the students tried, fewest first")
    distill: DistillStage = Field(default_factory=DistillStage, description="how each student trains ("
                                  "its `layers` is set by `students`)")
    prune_vocab: bool = Field(True, description="cut each candidate's token table to the tokens the data uses")
    quantize: Mode = Field("int8_dynamic", description="each candidate's precision")
    confidence: float = Field(0.95, ge=0.5, lt=1.0, description="accept a candidate when the gate on the held-out "
                              "half would pass with at least this probability, judged from its validation loss and "
                              "its standard error")
    validation_share: float = Field(0.25, gt=0.0, lt=1.0, description="tuning queries set aside to judge candidates "
                                    "(never trained on)")
    time_budget_s: float = Field(3600.0, gt=0.0, description="start no candidate after this many seconds")


Catalog = Literal["self", "teacher"]


class EncoderRecipe(BaseModel):
    """Ordered stages, the search data and the gate."""

    model_config = ConfigDict(extra="forbid")
    name: str = "recipe"
    description: str = ""
    data: str | None = Field(None, description="search data spec; `--data` overrides it")
    seed: int = Field(0, description="the query split, the distillation sample and the initialization")
    catalog: Catalog = Field("self", description="who embeds the catalog's titles where the encoder serves: "
                             "`self` (the compressed encoder, queries and titles alike) or `teacher` (the encoder "
                             "it was compressed from, once, offline: `recserve search-index --catalog-encoder`; the "
                             "compressed one embeds the queries); the report judges the encoder that way")
    stages: list[Stage] = Field(default_factory=list)
    search: EncoderSearch | None = None
    gate: EncoderGate = Field(default_factory=EncoderGate)

    @model_validator(mode="after")
    def _order(self) -> EncoderRecipe:
        if bool(self.stages) == (self.search is not None):
            raise ValueError("an encoder recipe has either 'stages' (run as given) or 'search' (a student found for "
                             "the gate's budget), not both and not neither")
        if self.search is not None and self.gate.max_relative_ndcg_loss is None:
            raise ValueError("a search needs a quality budget: set gate.max_relative_ndcg_loss")
        kinds = [s.type for s in self.stages]
        if "distill" in kinds[1:]:
            raise ValueError("distill trains from the teacher's PyTorch weights: it must be the first stage")
        if "prune_vocab" in kinds and "quantize" in kinds[:kinds.index("prune_vocab")]:
            raise ValueError("prune_vocab cuts the float embedding table: put it before quantize")
        if kinds.count("quantize") > 1 or kinds.count("prune_vocab") > 1:
            raise ValueError("quantize and prune_vocab may each appear once")
        return self


def parse_encoder_recipe(text: str, source: str = "recipe") -> EncoderRecipe:
    return parse_staged(EncoderRecipe, text, source, "an encoder recipe is a YAML mapping with 'stages' or 'search' "
                        "(and optionally 'gate', 'data', 'seed')", STAGE_TYPES,
                        unknown="{kind!r} is not a stage for a text encoder")


def load_encoder_recipe(path: Path) -> EncoderRecipe:
    text = read_text(path, "recipe", "pass a recipe such as recipes/query-encoder.yaml")
    return parse_encoder_recipe(text, str(path))
