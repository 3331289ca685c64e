"""The reference models' shapes, OOV handling, export and artifact round trip (untrained, fast)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from recserve.data import load_dataset
from recserve.errors import ConfigError, ModelError
from recserve.models.artifact import TrainedModel, is_trained_dir, load_trained, sample_feed
from recserve.models.pipeline import train_model
from recserve.models.ranker import Ranker, RankerConfig, mlp
from recserve.models.train import predict_logits
from recserve.models.two_tower import TwoTower, TwoTowerConfig

CARD = [5, 7, 3]


@pytest.fixture(scope="module")
def small_data():
    return load_dataset("synthetic:600,users=20,items=150")


def test_mlp_layers() -> None:
    seq = mlp([4, 8, 2])
    assert [type(m) for m in seq] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU]
    assert (seq[0].in_features, seq[0].out_features, seq[2].out_features) == (4, 8, 2)
    seq = mlp([4, 8, 6, 1], last_activation=False)
    assert [type(m) for m in seq] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]


def test_ranker_shapes_and_config_round_trip() -> None:
    config = RankerConfig(CARD, 2, embedding_dim=4, cross_layers=2, cross_rank=3, bottom_mlp=[8], top_mlp=[16])
    model = Ranker(RankerConfig(**json.loads(json.dumps(config.to_json()))))
    assert model.embedding.weight.shape == (sum(CARD), 4)
    assert len(model.cross) == 2 and isinstance(model.cross[0].proj, nn.Sequential)
    assert model.cross[0].proj[0].out_features == 3
    out = model(torch.zeros(5, 3, dtype=torch.int64), torch.zeros(5, 2))
    assert out.shape == (5, 1)


def test_ranker_feature_offsets_select_own_rows() -> None:
    model = Ranker(RankerConfig(CARD, 1, embedding_dim=2, cross_layers=0, bottom_mlp=[2], top_mlp=[2]))
    with torch.no_grad():
        model.embedding.weight.copy_(torch.arange(sum(CARD) * 2, dtype=torch.float32).reshape(-1, 2))
    emb = model.embedding(torch.tensor([[1, 2, 0]]) + model.offsets).flatten(1)
    # feature 0 id 1 -> row 1; feature 1 id 2 -> row 5 + 2; feature 2 id 0 -> row 5 + 7
    assert emb.tolist() == [[2.0, 3.0, 14.0, 15.0, 24.0, 25.0]]


def test_out_of_range_ids_fall_back_to_oov() -> None:
    torch.manual_seed(0)
    model = Ranker(RankerConfig(CARD, 2, embedding_dim=4, cross_layers=1, bottom_mlp=[4], top_mlp=[8])).eval()
    dense = torch.randn(4, 2)
    oov = torch.tensor([[0, 3, 1]] * 4)
    bad = torch.tensor([[5, 3, 1], [-1, 3, 1], [99, 3, 1], [0, 3, 1]])  # feature 0 has ids 0..4
    with torch.no_grad():
        np.testing.assert_allclose(model(bad, dense).numpy(), model(oov, dense).numpy(), rtol=1e-6)


def test_two_tower_embeddings_are_unit_vectors() -> None:
    model = TwoTower(TwoTowerConfig([4], [6, 3], embedding_dim=4, tower_mlp=[8], output_dim=5)).eval()
    with torch.no_grad():
        u, i = model(torch.tensor([[1], [2], [3]]), torch.tensor([[0, 0], [5, 2]]))
    assert u.shape == (3, 5) and i.shape == (2, 5)
    np.testing.assert_allclose(u.norm(dim=1).numpy(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(i.norm(dim=1).numpy(), 1.0, rtol=1e-5)


def test_export_round_trip_and_oov_in_onnx(small_data, tmp_path: Path) -> None:
    t = small_data.ranking_train
    config = RankerConfig([f.cardinality for f in t.sparse_features], len(t.dense_names), embedding_dim=4,
                          cross_layers=1, bottom_mlp=[4], top_mlp=[8])
    torch.manual_seed(0)
    trained = TrainedModel("ranker", config, Ranker(config).eval(), small_data.spec)
    graph = trained.export(small_data)
    trained.save(tmp_path, small_data, graph)
    assert is_trained_dir(tmp_path)
    back = load_trained(tmp_path)
    assert back.kind == "ranker" and back.config == config and back.data_spec == small_data.spec
    feed = sample_feed("ranker", small_data, n=10)
    assert feed["sparse"].shape == (10, len(config.cardinalities))
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, feed)
    assert got.shape == (10, 1)
    with torch.no_grad():
        want = torch.sigmoid(back.module(torch.from_numpy(feed["sparse"]), torch.from_numpy(feed["dense"]))).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # ids past a feature's vocabulary read that feature's OOV row in the served graph too
    bad = feed["sparse"].copy()
    bad[:, 0] = config.cardinalities[0] + 3
    oov = feed["sparse"].copy()
    oov[:, 0] = 0
    np.testing.assert_allclose(sess.run(None, {"sparse": bad, "dense": feed["dense"]})[0],
                               sess.run(None, {"sparse": oov, "dense": feed["dense"]})[0], rtol=1e-6)


def test_predict_logits_on_no_rows(small_data) -> None:
    t = small_data.ranking_train
    model = Ranker(RankerConfig([f.cardinality for f in t.sparse_features], len(t.dense_names), embedding_dim=2,
                                cross_layers=0, bottom_mlp=[2], top_mlp=[2]))
    assert predict_logits(model, t.take(np.arange(0))).shape == (0,)
    assert predict_logits(model, t.take(np.arange(7))).shape == (7,)


def test_load_trained_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a complete `recserve train` output"):
        load_trained(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"kind": "ranker", "config": {"cardinalities": [3]}}))
    with pytest.raises(ModelError, match="train again or pass model.onnx"):
        load_trained(tmp_path)


def test_train_model_out_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        train_model("synthetic:100", "ranker", f)


def test_logq_correction_lifts_two_tower_recall(tmp_path: Path) -> None:
    """In-batch softmax without the correction pushes popular items down (they are everyone's
    negatives); on the popularity-driven synthetic data that costs most of the retriever's recall."""
    quality = {logq: train_model("synthetic:20000", "two_tower", tmp_path / str(logq), epochs=6,
                                 logq_correction=logq)["quality"] for logq in (False, True)}
    assert quality[True]["recall@10"] > quality[False]["recall@10"] + 0.2, quality
    assert quality[True]["auc"] > quality[False]["auc"], quality
