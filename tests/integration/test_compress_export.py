"""ONNX export of the reference models: onnxruntime matches PyTorch, with a dynamic batch axis."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from recserve.converters.evaluate import model_kind
from recserve.data.schema import Dataset
from recserve.errors import ModelError
from recserve.models.artifact import load_trained
from recserve.models.export import check_against_torch, export_onnx


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch", [1, 37])
def test_ranker_onnx_matches_pytorch(ranker_dir: Path, tiny_data: Dataset, batch: int) -> None:
    trained = load_trained(ranker_dir)
    t = tiny_data.ranking_test
    idx = np.arange(100, 100 + batch)
    sparse, dense = t.sparse[idx], t.dense[idx]
    (got,) = _session(ranker_dir / "model.onnx").run(None, {"sparse": sparse, "dense": dense})
    with torch.no_grad():
        want = torch.sigmoid(trained.module(torch.from_numpy(sparse), torch.from_numpy(dense))).numpy()
    assert got.shape == (batch, 1) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert ((got > 0) & (got < 1)).all(), "the served output is a probability"


def test_ranker_graph_io(ranker_dir: Path) -> None:
    model = onnx.load(ranker_dir / "model.onnx")
    assert model_kind(model) == "ranker"
    ins = {i.name: i.type.tensor_type for i in model.graph.input}
    assert ins["sparse"].elem_type == onnx.TensorProto.INT64 and ins["dense"].elem_type == onnx.TensorProto.FLOAT
    assert [o.name for o in model.graph.output] == ["score"]
    # the batch axis is symbolic on every input and output
    for vi in [*model.graph.input, *model.graph.output]:
        dim0 = vi.type.tensor_type.shape.dim[0]
        assert dim0.dim_param and not dim0.HasField("dim_value"), vi.name


@pytest.mark.parametrize(("n_users", "n_items"), [(1, 37), (37, 1), (5, 5)])
def test_two_tower_onnx_matches_pytorch(two_tower_dir: Path, tiny_data: Dataset, n_users: int, n_items: int) -> None:
    trained = load_trained(two_tower_dir)
    r = tiny_data.retrieval
    users, items = r.user_table[:n_users], r.item_table[10:10 + n_items]
    got_u, got_i = _session(two_tower_dir / "model.onnx").run(None, {"user_sparse": users, "item_sparse": items})
    with torch.no_grad():
        want_u, want_i = trained.module(torch.from_numpy(users), torch.from_numpy(items))
    assert got_u.shape == (n_users, 16) and got_i.shape == (n_items, 16)
    np.testing.assert_allclose(got_u, want_u.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got_i, want_i.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got_u, axis=1), 1.0, rtol=1e-5)


def test_two_tower_graph_io(two_tower_dir: Path) -> None:
    model = onnx.load(two_tower_dir / "model.onnx")
    assert model_kind(model) == "two-tower"
    assert [o.name for o in model.graph.output] == ["user_embedding", "item_embedding"]


def test_export_check_detects_a_mismatch(ranker_dir: Path, tiny_data: Dataset) -> None:
    trained = load_trained(ranker_dir)
    sample = {"sparse": tiny_data.ranking_test.sparse[:16], "dense": tiny_data.ranking_test.dense[:16]}
    graph = export_onnx(trained.module, "ranker", sample)
    # a different module than the one exported: the check must refuse it
    with torch.no_grad():
        trained.module.top[0].bias.add_(1.0)
    from recserve.models.export import _RankerScore

    with pytest.raises(ModelError, match="does not match PyTorch"):
        check_against_torch(graph, _RankerScore(trained.module), sample, ("sparse", "dense"))
