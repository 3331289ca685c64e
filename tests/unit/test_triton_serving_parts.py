"""The pieces the Triton python models run, tested without a server: feature encoding, top-k, the item index,
retrieval layout and user-tower extraction, CLI request inputs, and the checked-in ensembles staying generated.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from recserve.converters.triton_config import from_pbtxt
from recserve.data.schema import Dataset, DenseTransform, RankingData, SparseFeature, Vocabulary
from recserve.errors import ConfigError, DataError, InferenceError, ModelError
from recserve.triton.ensembles import write_ensembles
from recserve.triton.features import FeatureEncoder, read_columns, sibling_file, top_k
from recserve.triton.inputs import inputs_from_json
from recserve.triton.retrieval import ItemIndex, Layout, detect_layout, extract_user_tower, save_index

ROOT = Path(__file__).resolve().parents[2]

# --- FeatureEncoder -------------------------------------------------------------------------------------------------


@pytest.fixture
def encoder() -> FeatureEncoder:
    return FeatureEncoder(
        ["color", "size"],
        [Vocabulary("color", ["red", "blue"]), Vocabulary("size", ["S", "M", "L"])],
        [DenseTransform("price", "log1p", mean=1.0, std=2.0), DenseTransform("match", "identity", fill=-1.0)],
    )


def test_encode_maps_tokens_to_ids_and_unknown_tokens_to_oov(encoder: FeatureEncoder) -> None:
    sparse, dense = encoder.encode(np.array([["red", "L"], ["green", "S"], ["blue", "XXL"]], dtype=object),
                                   np.array([[math.e - 1, 1.0], [0.0, 0.0], [-5.0, np.nan]]))
    np.testing.assert_array_equal(sparse, [[1, 3], [0, 1], [2, 0]])
    assert sparse.dtype == np.int64 and dense.dtype == np.float32
    assert sparse.flags["C_CONTIGUOUS"] and dense.flags["C_CONTIGUOUS"]
    # log1p: (log(1 + max(x, 0)) - 1) / 2; identity as is; NaN (missing) -> fill
    np.testing.assert_allclose(dense, [[0.0, 1.0], [-0.5, 0.0], [-0.5, -1.0]], atol=1e-6)


def test_encode_takes_bytes_as_triton_sends_them(encoder: FeatureEncoder) -> None:
    as_bytes = np.array([[b"blue", b"M"], [b"nope", b"L"]], dtype=object)
    as_str = np.array([["blue", "M"], ["nope", "L"]], dtype=object)
    dense = np.zeros((2, 2), np.float32)
    got_b, _ = encoder.encode(as_bytes, dense)
    got_s, _ = encoder.encode(as_str, dense)
    np.testing.assert_array_equal(got_b, [[2, 2], [0, 3]])
    np.testing.assert_array_equal(got_b, got_s)

@pytest.mark.parametrize("values, numbers", [
    ({"color": "red", "size": "L"}, {"price": math.e - 1, "match": 1.0}),
    ({"color": "green"}, {"price": -5.0}),  # unknown token, missing size, missing match, negative log1p input
    ({}, {"price": math.inf, "match": math.nan}),  # non-finite numbers are missing
    ({"size": "M", "other": "x"}, {"price": 1e9, "match": -3.25, "other": 2.0}),
])
def test_encode_one_is_encode_of_one_row(encoder: FeatureEncoder, values: dict, numbers: dict) -> None:
    """The router's single-row path maps a row exactly as the batch path (the Triton models') does."""
    sparse, dense = encoder.encode_one(values, numbers)
    want_sparse, want_dense = encoder.encode(
        np.array([[values.get(n, "") for n in encoder.sparse_names]], dtype=object),
        np.array([[numbers.get(t.name, np.nan) for t in encoder.transforms]]))
    assert sparse.dtype == np.int64 and dense.dtype == np.float32
    np.testing.assert_array_equal(sparse, want_sparse[0])
    np.testing.assert_array_equal(dense, want_dense[0])



@pytest.mark.parametrize("sparse, dense, needle", [
    (np.array([["red", "S", "x"]], dtype=object), np.zeros((1, 2)), "sparse features: expected \\[N, 2\\]"),
    (np.array([["red"]], dtype=object), np.zeros((1, 2)), "sparse features"),
    (np.array(["red", "S"], dtype=object), np.zeros((1, 2)), "sparse features"),
    (np.array([["red", "S"]], dtype=object), np.zeros((1, 3)), "dense features: expected \\[N, 2\\]"),
    (np.array([["red", "S"]], dtype=object), np.zeros(2), "dense features"),
    (np.array([["red", "S"]] * 2, dtype=object), np.zeros((3, 2)), "2 sparse rows but 3 dense rows"),
])
def test_encode_refuses_wrong_column_counts(encoder: FeatureEncoder, sparse, dense, needle: str) -> None:
    with pytest.raises(InferenceError, match=needle):
        encoder.encode(sparse, dense)


def test_encoder_loads_saved_preprocessing_in_model_column_order(tmp_path: Path) -> None:
    path = tmp_path / "preprocessing.json"
    path.write_text(json.dumps({
        "vocabularies": {"b": {"name": "b", "tokens": ["x", "y"]}, "a": {"name": "a", "tokens": ["p"]}},
        "dense_transforms": [{"name": "d", "kind": "identity", "mean": 2.0, "std": 4.0, "fill": 0.0}],
        "columns": {"ranking_sparse": ["a", "b"], "ranking_dense": ["d"]},
    }))
    assert read_columns(path) == {"ranking_sparse": ["a", "b"], "ranking_dense": ["d"]}
    enc = FeatureEncoder.load(path, read_columns(path)["ranking_sparse"])
    sparse, dense = enc.encode(np.array([["p", "y"]], dtype=object), np.array([[10.0]]))
    np.testing.assert_array_equal(sparse, [[1, 2]])
    np.testing.assert_allclose(dense, [[2.0]])
    assert FeatureEncoder.load(path).sparse_names == ["b", "a"]  # no column list: the file's order


def test_sibling_file_is_in_the_newest_version(tmp_path: Path) -> None:
    for v in ("1", "3", "10"):
        (tmp_path / "ranker" / v).mkdir(parents=True)
    (tmp_path / "recommend_preprocess").mkdir()
    assert sibling_file(str(tmp_path / "recommend_preprocess") + "/", "ranker", "p.json") == tmp_path / "ranker" / "10" / "p.json"
    with pytest.raises(FileNotFoundError, match="no version"):
        sibling_file(str(tmp_path / "recommend_preprocess"), "absent", "p.json")


# --- top_k ----------------------------------------------------------------------------------------------------------


def test_top_k_best_first_stable_for_ties() -> None:
    scores = np.array([0.1, 0.5, 0.5, 0.2, 0.9], np.float32)
    assert top_k(scores, 3).tolist() == [4, 1, 2]
    assert top_k(scores, 10).tolist() == [4, 1, 2, 3, 0]
    assert top_k(scores.reshape(5, 1), 2).tolist() == [4, 1]  # the ranker's [N, 1] scores
    assert top_k(scores, 0).tolist() == [] and top_k(scores, -3).tolist() == []
    assert top_k(np.array([]), 5).tolist() == []


# --- ItemIndex ------------------------------------------------------------------------------------------------------


LAYOUT = Layout(sparse_item=[1, 2], sparse_context=[0, 3], dense_item=[1], dense_context=[0],
                sparse_names=["user_id", "item_id", "category", "query_id"], dense_names=["match", "price"])


@pytest.fixture
def index(tmp_path: Path) -> ItemIndex:
    arrays = {
        "embeddings": np.array([[1, 0], [0, 1], [0.6, 0.8], [-1, 0], [0.8, 0.6]], np.float32),
        "item_ids": np.array(["a", "b", "c", "d", "e"]),
        "item_sparse": np.array([[11, 1], [12, 2], [13, 1], [14, 3], [15, 2]], np.int64),
        "item_dense": np.array([[0.5], [1.5], [2.5], [3.5], [4.5]], np.float32),
        "layout": LAYOUT.__dict__,
    }
    save_index(arrays, tmp_path)
    return ItemIndex(tmp_path)


def test_index_search_best_first(index: ItemIndex) -> None:
    rows, scores = index.search(np.array([[1.0, 0.0]], np.float32), 3)
    assert rows.tolist() == [0, 4, 2]
    np.testing.assert_allclose(scores, [1.0, 0.8, 0.6], rtol=1e-6)
    assert index.item_ids[rows].tolist() == ["a", "e", "c"]
    rows, scores = index.search(np.array([0.0, 2.0]), 50)  # k above the item count: every item
    assert rows.tolist() == [1, 2, 4, 0, 3] and np.all(np.diff(scores) <= 0)
    rows, _ = index.search(np.array([-1.0, 0.0]), 0)  # at least one
    assert rows.tolist() == [3]


def test_index_ranker_rows_put_item_and_context_columns_in_place(index: ItemIndex) -> None:
    sparse, dense = index.ranker_rows(np.array([4, 0]), np.array([[7, 9]]), np.array([[0.25]]))
    np.testing.assert_array_equal(sparse, [[7, 15, 2, 9], [7, 11, 1, 9]])
    np.testing.assert_allclose(dense, [[0.25, 4.5], [0.25, 0.5]])
    assert sparse.dtype == np.int64 and dense.dtype == np.float32
    with pytest.raises(InferenceError, match="context: expected 2 sparse \\(user_id, query_id\\) and 1 dense \\(match\\)"):
        index.ranker_rows(np.array([0]), np.array([7]), np.array([0.25]))
    with pytest.raises(InferenceError):
        index.ranker_rows(np.array([0]), np.array([7, 9]), np.array([0.25, 1.0]))


# --- detect_layout --------------------------------------------------------------------------------------------------


def _dataset(sparse: np.ndarray, dense: np.ndarray, names=("user_id", "item_id", "category")) -> Dataset:
    feats = [SparseFeature(n, 100) for n in names]
    data = RankingData(feats, ["price", "match"], sparse.astype(np.int64), dense.astype(np.float32),
                       np.zeros(len(sparse), np.float32))
    return Dataset("tiny", "tiny", {}, ranking_train=data)


def test_detect_layout_splits_item_columns_from_context() -> None:
    # user_id varies within an item, category is the item's; price is the item's, match varies
    sparse = np.array([[1, 5, 2], [2, 5, 2], [1, 6, 3], [3, 6, 3], [3, 7, 2]])
    dense = np.array([[9.0, 1], [9.0, 0], [4.0, 0], [4.0, 0], [1.0, 1]])
    layout = detect_layout(_dataset(sparse, dense))
    assert (layout.sparse_item, layout.sparse_context) == ([1, 2], [0])
    assert (layout.dense_item, layout.dense_context) == ([0], [1])
    assert layout.context_sparse_names == ["user_id"] and layout.context_dense_names == ["match"]


def test_detect_layout_needs_an_item_id_column() -> None:
    with pytest.raises(DataError, match="item_id"):
        detect_layout(_dataset(np.ones((3, 3)), np.ones((3, 2)), names=("user_id", "product", "category")))


def test_detect_layout_of_the_synthetic_search_log() -> None:
    from recserve.data import load_dataset

    layout = detect_layout(load_dataset("synthetic:2000,users=50,items=300", eval_negatives=10))
    assert layout.context_sparse_names == ["user_id", "query_id"]
    assert [layout.sparse_names[j] for j in layout.sparse_item] == ["item_id", "category", "brand", "price_bucket"]
    assert [layout.dense_names[j] for j in layout.dense_item] == ["price", "item_popularity"]
    assert layout.context_dense_names == ["query_category_match"]


# --- extract_user_tower ---------------------------------------------------------------------------------------------


def test_extracted_user_tower_equals_the_two_tower_user_embedding() -> None:
    from recserve.models.artifact import build_module
    from recserve.models.export import export_onnx
    from recserve.models.two_tower import TwoTowerConfig

    module = build_module("two-tower", TwoTowerConfig([13, 4], [17, 5], embedding_dim=4, tower_mlp=[8], output_dim=6))
    rng = np.random.default_rng(1)
    users = np.stack([rng.integers(0, 13, 9), rng.integers(0, 4, 9)], axis=1).astype(np.int64)
    items = np.stack([rng.integers(0, 17, 5), rng.integers(0, 5, 5)], axis=1).astype(np.int64)
    graph = export_onnx(module, "two-tower", {"user_sparse": users, "item_sparse": items})
    tower = extract_user_tower(graph)
    assert [i.name for i in tower.graph.input] == ["user_sparse"]
    assert [o.name for o in tower.graph.output] == ["user_embedding"]
    full = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    want, _ = full.run(None, {"user_sparse": users, "item_sparse": items})
    sess = ort.InferenceSession(tower.SerializeToString(), providers=["CPUExecutionProvider"])
    for rows in (users[:1], users):
        (got,) = sess.run(None, {"user_sparse": rows})
        np.testing.assert_allclose(got, want[:len(rows)], rtol=1e-6, atol=1e-7)
    with pytest.raises(ModelError, match="not a two-tower"):
        extract_user_tower(_ranker_like_graph())


def _ranker_like_graph():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("sparse", TensorProto.INT64, ["b", 2])
    y = helper.make_tensor_value_info("score", TensorProto.INT64, ["b", 2])
    return helper.make_model(helper.make_graph([helper.make_node("Identity", ["sparse"], ["score"])], "g", [x], [y]),
                             opset_imports=[helper.make_opsetid("", 17)])


# --- ensembles ------------------------------------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and "__pycache__" not in p.parts}


def test_checked_in_model_repository_is_what_write_ensembles_generates(tmp_path: Path) -> None:
    written = write_ensembles(tmp_path)
    assert sorted(d.name for d in written) == ["recommend", "recommend_preprocess", "recommend_topk", "retrieve",
                                               "retrieve_preprocess"]
    generated, checked_in = _tree(tmp_path), _tree(ROOT / "model_repository")
    assert sorted(generated) == sorted(checked_in), "run `recserve build-ensembles --repository model_repository`"
    for name, data in generated.items():
        assert checked_in[name] == data, f"model_repository/{name} is stale: run `recserve build-ensembles`"


def test_ensembles_call_the_named_ranker(tmp_path: Path) -> None:
    write_ensembles(tmp_path, ranker="ranker_int8")
    rec = from_pbtxt((tmp_path / "recommend" / "config.pbtxt").read_text())
    assert [s.model_name for s in rec.ensemble_scheduling.step] == ["recommend_preprocess", "ranker_int8",
                                                                    "recommend_topk"]
    pre = from_pbtxt((tmp_path / "recommend_preprocess" / "config.pbtxt").read_text())
    assert pre.parameters["ranker_model"].string_value == "ranker_int8"
    ret = from_pbtxt((tmp_path / "retrieve" / "config.pbtxt").read_text())
    assert [s.model_name for s in ret.ensemble_scheduling.step] == ["retrieve_preprocess", "user_tower", "item_index",
                                                                    "ranker_int8", "recommend_topk"]
    again = write_ensembles(tmp_path, ranker="ranker_int8")  # idempotent: rewriting is allowed
    assert len(again) == 5


@pytest.mark.parametrize("depth", [0, 100])
def test_the_search_ensemble_with_and_without_its_ranker(depth: int) -> None:
    """Every step's inputs are the ensemble's or an earlier step's outputs, of the type and width the step
    declares; with a ranker (``depth``) product_index hands ``depth`` candidates and their features on."""
    from recserve.triton.ensembles import search_configs
    from recserve.triton.search_features import FEATURES

    configs = {c.name: c for c in search_configs(384, depth=depth)}
    ens = configs.pop("search")
    steps = [s.model_name for s in ens.ensemble_scheduling.step]
    assert steps == ["query_tokenize", "query_encoder", "product_index"] + \
        (["search_ranker", "search_topk"] if depth else [])
    assert configs["product_index"].parameters["rerank_depth"].string_value == str(depth)
    tensors = {i.name: (i.data_type, list(i.dims)) for i in ens.input}
    for step in ens.ensemble_scheduling.step:
        cfg = configs[step.model_name]
        declared = {i.name: (i.data_type, list(i.dims)) for i in cfg.input}
        assert set(step.input_map) == set(declared), step.model_name
        for name, tensor in step.input_map.items():
            have_type, have_dims = tensors[tensor]
            assert have_type == declared[name][0], (step.model_name, name)
            assert len(have_dims) == len(declared[name][1]), (step.model_name, name)
        outputs = {o.name: (o.data_type, list(o.dims)) for o in cfg.output}
        tensors |= {tensor: outputs[name] for name, tensor in step.output_map.items()}
    assert {o.name for o in ens.output} <= set(tensors)
    assert configs["search_ranker"].input[0].dims == [-1, len(FEATURES)]


# --- recserve infer --json ------------------------------------------------------------------------------------------


RANKER_CONFIG = {"input": [{"name": "sparse", "data_type": "TYPE_INT64", "dims": ["6"]},
                           {"name": "dense", "data_type": "TYPE_FP32", "dims": ["3"]}]}


def test_inputs_from_json_types_arrays_by_the_model_config() -> None:
    feed = inputs_from_json('{"sparse": [[1, 2, 3, 4, 5, 6]], "dense": [[0.5, 1, 2]]}', RANKER_CONFIG)
    assert feed["sparse"].dtype == np.int64 and feed["sparse"].shape == (1, 6)
    assert feed["dense"].dtype == np.float32 and feed["dense"].tolist() == [[0.5, 1.0, 2.0]]


@pytest.mark.parametrize("text, needle", [
    ('{"sparse": [[1]]}', "exactly the model's inputs"),
    ('{"sparse": [[1]], "dense": [[1]], "extra": 1}', "exactly the model's inputs"),
    ("[1, 2]", "exactly the model's inputs"),
    ('{"sparse": [[1, 2', "not valid JSON"),
    ('{"sparse": [["x"]], "dense": [[1]]}', "--json"),
])
def test_inputs_from_json_errors_are_config_errors(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        inputs_from_json(text, RANKER_CONFIG)


def test_inputs_from_json_keeps_string_inputs_as_strings() -> None:
    config = {"input": [{"name": "item_ids", "data_type": "TYPE_STRING", "dims": ["-1"]},
                        {"name": "top_k", "data_type": "TYPE_INT32", "dims": ["1"]}]}
    feed = inputs_from_json('{"item_ids": ["1001", "shoe"], "top_k": [1]}', config)
    assert feed["item_ids"].dtype == np.object_ and feed["item_ids"].tolist() == ["1001", "shoe"]
    assert feed["top_k"].dtype == np.int32
