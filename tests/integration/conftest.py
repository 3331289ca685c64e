"""Shared fixtures for the compression integration tests: tiny models trained once per session.

Everything is sized to run in seconds on 2 CPU cores: a few thousand synthetic rows, 200 users,
300 items, a ranker with 8-wide embeddings, one cross layer and a [32, 16] top MLP, and a small
two-tower. Training uses one thread (the machine is shared; oversubscribed threads are far slower).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest

from recserve.converters.evaluate import Scoring, evaluate, held_out
from recserve.converters.stage import ModelState, StageContext
from recserve.data import load_dataset
from recserve.data.schema import Dataset
from recserve.models.artifact import TrainedModel, build_module, load_trained
from recserve.models.ranker import RankerConfig
from recserve.models.train import TrainSettings, fit_ranker, fit_two_tower
from recserve.models.two_tower import TwoTowerConfig

TINY_SPEC = "synthetic:8000,users=200,items=300"
TINY_TRAIN = TrainSettings(epochs=2, batch_size=256, learning_rate=5e-3, threads=1, seed=0)
"""How the fixtures train; ``compress(train=...)`` and stage contexts reuse it (1 epoch)."""
FINE_TUNE = replace(TINY_TRAIN, epochs=1)


def tiny_ranker_config(data: Dataset, **overrides) -> RankerConfig:
    t = data.ranking_train
    kw = dict(embedding_dim=8, cross_layers=1, bottom_mlp=[16], top_mlp=[32, 16])
    kw.update(overrides)
    return RankerConfig([f.cardinality for f in t.sparse_features], len(t.dense_names), **kw)


def _save(trained: TrainedModel, data: Dataset, out: Path) -> Path:
    graph = trained.export(data)
    test = held_out(data, trained.kind, "test")
    trained.metrics = {"held_out": evaluate(graph, Scoring(trained.kind), test, speed=False).quality}
    trained.save(out, data, graph)
    return out


@pytest.fixture(scope="session")
def ranker_config():
    """``ranker_config(data, **overrides)``: the tiny ranker's shape (overrides e.g. ``cross_rank=4``)."""
    return tiny_ranker_config


@pytest.fixture(scope="session")
def tiny_data() -> Dataset:
    return load_dataset(TINY_SPEC)


@pytest.fixture(scope="session")
def ranker_dir(tmp_path_factory: pytest.TempPathFactory, tiny_data: Dataset) -> Path:
    """A `recserve train`-style directory holding a tiny trained ranker (do not write into it)."""
    config = tiny_ranker_config(tiny_data)
    module = build_module("ranker", config, seed=0)
    fit_ranker(module, tiny_data.ranking_fit(), TINY_TRAIN, validation=tiny_data.ranking_validation())
    return _save(TrainedModel("ranker", config, module, TINY_SPEC), tiny_data, tmp_path_factory.mktemp("ranker"))


@pytest.fixture(scope="session")
def two_tower_dir(tmp_path_factory: pytest.TempPathFactory, tiny_data: Dataset) -> Path:
    r = tiny_data.retrieval
    config = TwoTowerConfig([f.cardinality for f in r.user_features], [f.cardinality for f in r.item_features],
                            embedding_dim=8, tower_mlp=[32], output_dim=16)
    module = build_module("two-tower", config, seed=0)
    fit_two_tower(module, r, TINY_TRAIN)
    return _save(TrainedModel("two-tower", config, module, TINY_SPEC), tiny_data, tmp_path_factory.mktemp("tt"))


@pytest.fixture(scope="session")
def _ranker_loaded(ranker_dir: Path) -> TrainedModel:
    return load_trained(ranker_dir)


@pytest.fixture
def ranker_state(ranker_dir: Path, _ranker_loaded: TrainedModel) -> ModelState:
    """A fresh state (graph + its own copy of the module): stages mutate modules in place."""
    import onnx

    return ModelState("ranker", onnx.load(ranker_dir / "model.onnx"), copy.deepcopy(_ranker_loaded.module))


@pytest.fixture
def ranker_graph_state(ranker_dir: Path) -> ModelState:
    """The same ranker as a graph-only state (as from a plain .onnx file)."""
    import onnx

    return ModelState("ranker", onnx.load(ranker_dir / "model.onnx"))


@pytest.fixture
def ctx(tiny_data: Dataset) -> StageContext:
    return StageContext(tiny_data, Scoring("ranker"), FINE_TUNE)
