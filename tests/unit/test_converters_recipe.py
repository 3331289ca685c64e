"""Recipe parsing: every shipped recipe parses; every mistake is a ConfigError naming where it is."""

from __future__ import annotations

from pathlib import Path

import pytest

from recserve.converters.distill import DistillStage
from recserve.converters.embeddings import EmbeddingStage
from recserve.converters.lowrank import LowRankStage
from recserve.converters.prune import PruneStage
from recserve.converters.quantize import QuantizeStage
from recserve.converters.recipe import Recipe, load_recipe, parse_recipe
from recserve.errors import ConfigError, RecserveError

ENCODER_RECIPES = {"query-encoder", "query-encoder-gpu"}
"""Recipes for text encoders (recserve.encoder.recipe: tests/unit/test_encoder_recipe.py)."""
RECIPES = sorted(p for p in (Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml")
                 if p.stem not in ENCODER_RECIPES)


def test_recipes_directory_is_not_empty() -> None:
    assert len(RECIPES) >= 5


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipes_parse(path: Path) -> None:
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.name == path.stem
    assert recipe.stages or recipe.search
    assert recipe.gate.min_distinct_score_ratio == 0.5, "every shipped recipe checks that scores still rank"
    assert recipe.gate.model_dump(exclude_none=True), "every shipped recipe should gate something"


def test_ranker_8x_recipe_contents() -> None:
    recipe = load_recipe(next(p for p in RECIPES if p.stem == "ranker-8x"))
    distill, quant, emb = recipe.stages
    assert isinstance(distill, DistillStage) and distill.student.cross_rank == 16
    assert distill.student.top_mlp == [128, 64]
    assert isinstance(quant, QuantizeStage) and quant.mode == "int8_static" and quant.per_channel
    assert isinstance(emb, EmbeddingStage) and emb.bits == 4
    assert recipe.gate.max_relative_auc_loss == 0.001 and recipe.gate.min_size_ratio == 8


def test_defaults_and_discrimination() -> None:
    recipe = parse_recipe("stages:\n  - type: prune\n  - type: low_rank\n    rank: 8\n  - type: embeddings\n")
    prune, low, emb = recipe.stages
    assert isinstance(prune, PruneStage) and (prune.method, prune.sparsity, prune.scope) == ("magnitude", 0.5, "global")
    assert isinstance(low, LowRankStage) and low.rank == 8 and low.energy is None
    assert isinstance(emb, EmbeddingStage) and emb.bits == 8 and emb.min_count == 0
    assert recipe.seed == 0 and recipe.data is None and recipe.gate.max_relative_auc_loss is None


def test_search_recipe_defaults() -> None:
    recipe = parse_recipe("search: {}\ngate: {max_relative_auc_loss: 0.001}\n")
    assert recipe.stages == [] and recipe.search is not None
    s = recipe.search
    assert (s.objective, s.time_budget_s, s.confidence, s.students) == ("size", 1200.0, 0.95, "auto")
    assert s.embedding_bits == [4, 8] and s.mixed_dimension and s.quantize == ["int8_static", "fp16"]
    assert recipe.gate.min_distinct_score_ratio == 0.5
    custom = parse_recipe("search:\n  objective: throughput\n  students: [{embedding_dim: 4, top_mlp: [8]}]\n"
                          "gate: {max_relative_auc_loss: 0.01, min_distinct_score_ratio: null}\n")
    assert custom.search.students[0].embedding_dim == 4 and custom.gate.min_distinct_score_ratio is None
    assert s.distill.workers is None  # students train in this process unless told otherwise


def test_distillation_on_ray_train_is_asked_for_with_workers() -> None:
    stage = parse_recipe("stages: [{type: distill, workers: 4}]").stages[0]
    assert isinstance(stage, DistillStage) and stage.workers == 4
    assert parse_recipe("stages: [{type: distill}]").stages[0].workers is None
    search = parse_recipe("search: {distill: {workers: 2}}\ngate: {max_relative_auc_loss: 0.01}\n").search
    assert search.distill.workers == 2


def test_embeddings_bits_null_keeps_float() -> None:
    assert parse_recipe("stages: [{type: embeddings, bits: null, min_count: 3}]").stages[0].bits is None


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("stages:\n  - type: prunez\n", ["stages.0", "unknown stage type 'prunez'", "low_rank"]),
        ("stages:\n  - {sparsity: 0.5}\n", ["stages.0", "unknown stage type None"]),
        ("stages:\n  - type: quantize\n  - type: prune\n    sparsity: 1.5\n", ["stages.1.prune.sparsity", "less than 1"]),
        ("stages:\n  - type: prune\n    sparsity: 0\n", ["stages.0.prune.sparsity", "greater than 0"]),
        ("stages:\n  - type: prune\n    method: random\n", ["stages.0.prune.method"]),
        ("stages:\n  - type: prune\n    spasity: 0.5\n", ["stages.0.prune.spasity", "Extra inputs"]),
        ("stages:\n  - type: quantize\n    mode: int4\n", ["stages.0.quantize.mode"]),
        ("stages:\n  - type: embeddings\n    bits: 2\n", ["stages.0.embeddings.bits"]),
        ("stages:\n  - type: distill\n    student: {width: 3}\n", ["stages.0.distill.student.width"]),
        ("stages:\n  - type: distill\n    workers: 0\n", ["stages.0.distill.workers", "greater than or equal to 1"]),
        ("stages:\n  - type: low_rank\n    rank: 4\n    energy: 0.9\n", ["stages.0.low_rank", "exactly one"]),
        ("stages:\n  - type: low_rank\n", ["stages.0.low_rank", "exactly one"]),
        ("stages:\n  - type: low_rank\n    energy: 1.5\n", ["stages.0.low_rank.energy"]),
        ("stagez:\n  - type: prune\n", ["stagez", "Extra inputs"]),
        ("stages: []\n", ["either 'stages'", "'search'"]),
        ("stages: [{type: prune}]\nsearch: {}\ngate: {max_relative_auc_loss: 0.01}\n", ["not both"]),
        ("search: {}\n", ["quality budget", "max_relative_auc_loss"]),
        ("search: {objective: latency}\ngate: {max_relative_auc_loss: 0.01}\n", ["search.objective"]),
        ("search: {confidence: 1.5}\ngate: {max_relative_auc_loss: 0.01}\n", ["search.confidence"]),
        ("search: {students: some}\ngate: {max_relative_auc_loss: 0.01}\n", ["search.students"]),
        ("search: {embedding_bits: [2]}\ngate: {max_relative_auc_loss: 0.01}\n", ["search.embedding_bits"]),
        ("stages:\n  - type: embeddings\n    rare_dim: 0\n", ["stages.0.embeddings.rare_dim"]),
        ("stages:\n  - type: prune\ngate:\n  min_distinct_score_ratio: 1.5\n", ["gate.min_distinct_score_ratio"]),
        ("stages:\n  - type: prune\ngate:\n  min_size_ratio: 0\n", ["gate.min_size_ratio"]),
        ("stages:\n  - type: prune\ngate:\n  max_auc_loss: 0.1\n", ["gate.max_auc_loss", "Extra inputs"]),
        ("stages:\n  - type: prune\ngate:\n  max_relative_auc_loss: -0.1\n", ["gate.max_relative_auc_loss"]),
        ("- type: prune\n", ["YAML mapping", "stages"]),
        ("just a string\n", ["YAML mapping"]),
        ("", ["YAML mapping"]),
        ("stages: [\n  - type: prune\n", ["not valid YAML"]),
        ("stages:\n\t- type: prune\n", ["not valid YAML"]),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None,
)
def test_mistakes_are_config_errors_naming_the_field(text: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        parse_recipe(text, "my.yaml")
    msg = str(e.value)
    assert msg.startswith("my.yaml: ")
    for needle in needles:
        assert needle in msg, msg
    assert "\n" not in msg, "the CLI prints errors as one line"


@pytest.mark.parametrize("text", ["stages: 3\n", "stages: true\n"])
def test_scalar_stages_is_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="stages"):
        parse_recipe(text, "my.yaml")


def test_load_recipe_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_recipe(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(e.value) and "recipes/" in str(e.value)
    assert isinstance(e.value, RecserveError) and e.value.exit_code == 2


def test_load_recipe_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("stages:\n  - type: prune\n    sparsity: 1.5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: stages\.0\.prune\.sparsity"):
        load_recipe(p)


def test_load_recipe_binary_file(tmp_path: Path) -> None:
    p = tmp_path / "model.onnx"
    p.write_bytes(b"\x08\x07\x12\x08recserve\x96\xff\xfe\x00\x81")
    with pytest.raises(ConfigError):
        load_recipe(p)
