"""The status codes recserve's Triton python models answer with, tested without a server.

What the caller got wrong (a shape, a count, a NaN, bytes that are not UTF-8, an id onnxruntime refuses) is
INVALID_ARG; anything else is a bug of ours and INTERNAL; every message is bounded. The models run against a
stand-in for ``triton_python_backend_utils`` (the real one exists only inside Triton's python stub).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from recserve.data.schema import Vocabulary
from recserve.errors import InferenceError, ModelError
from recserve.triton.features import FeatureEncoder
from recserve.triton.retrieval import save_index
from recserve.triton.validation import (
    MESSAGE_LIMIT,
    bounded,
    error_status,
    require_finite,
    require_shape,
    top_k_inputs,
    triton_error,
    user_embedding_input,
)

ROOT = Path(__file__).resolve().parents[2]
BACKEND = ROOT / "recserve" / "triton" / "backends" / "onnxruntime" / "model.py"


# --- a stand-in for triton_python_backend_utils ----------------------------------------------------------------------


class TritonError:
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE = range(5)  # the real class has these (and more) too

    def __init__(self, message: str, code: int = 1):
        self.text, self.code = message, code

    def message(self) -> str:
        return self.text


class Tensor:
    def __init__(self, name: str, array: np.ndarray):
        self._name, self.array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self.array


class InferenceResponse:
    def __init__(self, output_tensors=None, error=None):
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors or []}
        self.error = error


class Request:
    def __init__(self, **arrays: np.ndarray):
        self.tensors = [Tensor(n, a) for n, a in arrays.items()]

    def inputs(self) -> list[Tensor]:
        return self.tensors


def get_input_tensor_by_name(request: Request, name: str) -> Tensor | None:
    return next((t for t in request.tensors if t.name() == name), None)


@pytest.fixture
def pb_utils(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    fake = types.ModuleType("triton_python_backend_utils")
    fake.TritonError, fake.Tensor, fake.InferenceResponse = TritonError, Tensor, InferenceResponse
    fake.get_input_tensor_by_name = get_input_tensor_by_name
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    return fake


def python_model(name: str, pb_utils: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = importlib.import_module(f"recserve.triton.models.{name}")
    monkeypatch.setattr(module, "pb_utils", pb_utils)  # whichever stand-in it was first imported with
    return module


def refused(response: InferenceResponse) -> tuple[int, str]:
    assert response.error is not None, f"answered {sorted(response.outputs)}"
    return response.error.code, response.error.message()


# --- the pure parts -------------------------------------------------------------------------------------------------


def test_bounded_keeps_short_messages_and_cuts_long_ones_to_one_line() -> None:
    assert bounded("short message") == "short message"
    assert bounded("two\nlines\r") == "two lines "
    long = bounded("x" * 10_000)
    assert long.startswith("x" * MESSAGE_LIMIT) and long.endswith("... (9700 more characters)")
    assert len(long) < MESSAGE_LIMIT + 40


def test_error_status_is_invalid_arg_for_the_callers_mistakes_and_internal_for_ours() -> None:
    assert error_status(InferenceError("3 item_ids for 4 candidate rows")) == \
        ("INVALID_ARG", "3 item_ids for 4 candidate rows")
    code, message = error_status(ValueError("matmul: shapes do not align"))
    assert code == "INTERNAL" and message == "internal error (ValueError): matmul: shapes do not align"
    code, message = error_status(InferenceError("input 'x' " + "y" * 50_000))  # echoed input: bounded
    assert code == "INVALID_ARG" and len(message) < MESSAGE_LIMIT + 40
    assert len(error_status(KeyError("k" * 50_000))[1]) < MESSAGE_LIMIT + 40


def test_triton_error_sets_the_code_and_falls_back_to_a_message_on_an_old_triton(pb_utils) -> None:
    err = triton_error(pb_utils, "INVALID_ARG", "bad")
    assert (err.code, err.message()) == (TritonError.INVALID_ARG, "bad")
    assert triton_error(pb_utils, "INTERNAL", "ours").code == TritonError.INTERNAL

    class OldTritonError:  # before TritonError took a code: the message alone (Triton makes it INTERNAL)
        def __init__(self, message):
            self.text = message

    old = types.SimpleNamespace(TritonError=OldTritonError)
    assert triton_error(old, "INVALID_ARG", "bad").text == "bad"


def test_require_shape_and_finite() -> None:
    a = np.zeros((1, 4), np.float32)
    assert require_shape("e", a, (1, None)) is a and require_shape("e", a, (None, 4)) is a
    for shape in [(1, 3), (2, None), (1,), (1, 4, 1)]:
        with pytest.raises(InferenceError, match=r"input 'e': expected shape \["):
            require_shape("e", a, shape)
    assert require_finite("e", a) is a
    assert require_finite("ids", np.array([-1, 2**62])) is not None  # integers are always finite
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(InferenceError, match="input 'e' has NaN or infinite values"):
            require_finite("e", np.array([[0.0, bad]], np.float32))


def test_top_k_inputs() -> None:
    scores, items, k = top_k_inputs(np.array([[0.5], [0.25]], np.float32), np.array([b"a", b"b"], object),
                                    np.array([1], np.int32))
    assert scores.tolist() == [0.5, 0.25] and items.tolist() == [b"a", b"b"] and k == 1
    assert top_k_inputs(np.zeros((0, 1), np.float32), np.array([], object), np.array([0], np.int32))[2] == 0
    cases = [
        (np.zeros((2, 1)), np.array(["a"], object), [1], "1 item_ids for 2 candidate rows"),
        (np.array([[np.nan], [0.0]]), np.array(["a", "b"], object), [1], "input 'score' has NaN"),
        (np.zeros((2, 2)), np.array(["a", "b"], object), [1], r"input 'score': expected shape \[N, 1\]"),
        (np.zeros((2, 1)), np.array(["a", "b"], object), [-3], "top_k must be >= 0, got -3"),
        (np.zeros((2, 1)), np.array(["a", "b"], object), [1, 2], "input 'top_k': expected one value"),
    ]
    for scores, items, k, needle in cases:
        with pytest.raises(InferenceError, match=needle):
            top_k_inputs(scores, items, np.array(k, np.int32))


def test_user_embedding_input() -> None:
    assert user_embedding_input(np.ones((1, 3), np.float32), 3).shape == (3,)
    for bad, needle in [(np.ones((2, 3)), "one user per request"), (np.ones((0, 3)), "one user per request"),
                        (np.ones(3), "one user per request"), (np.ones((1, 4)), r"expected shape \[1, 3\]"),
                        (np.array([[1.0, np.inf, 0.0]]), "NaN or infinite")]:
        with pytest.raises(InferenceError, match=needle):
            user_embedding_input(bad, 3)


def test_encoder_refuses_bytes_that_are_not_utf8_as_the_callers_mistake() -> None:
    enc = FeatureEncoder(["color"], [Vocabulary("color", ["red"])], [])
    with pytest.raises(InferenceError, match="sparse features: a value is not UTF-8 text"):
        enc.encode(np.array([[b"red"], [b"\xff\xfe"]], dtype=object), np.zeros((2, 0)))
    sparse, _ = enc.encode(np.array([[b"red"], ["é".encode()]], dtype=object), np.zeros((2, 0)))
    assert sparse.ravel().tolist() == [1, 0]


# --- the python models ----------------------------------------------------------------------------------------------


def test_recommend_topk_answers_each_request_with_its_own_status(pb_utils, monkeypatch) -> None:
    module = python_model("recommend_topk", pb_utils, monkeypatch)
    model = module.TritonPythonModel()
    items = np.array([b"a", b"b", b"c"], object)
    good = Request(score=np.array([[0.1], [0.9], [0.5]], np.float32), item_ids=items, top_k=np.array([2], np.int32))
    short = Request(score=np.zeros((3, 1), np.float32), item_ids=items[:2], top_k=np.array([2], np.int32))
    nan = Request(score=np.full((3, 1), np.nan, np.float32), item_ids=items, top_k=np.array([2], np.int32))
    ok, bad, bad_nan = model.execute([good, short, nan])
    assert ok.error is None and ok.outputs["items"].tolist() == [b"b", b"c"]
    assert refused(bad) == (TritonError.INVALID_ARG, "2 item_ids for 3 candidate rows")
    assert refused(bad_nan)[0] == TritonError.INVALID_ARG

    def broken(scores, k):
        raise IndexError("a bug of ours")

    monkeypatch.setattr(module, "top_k", broken)
    (answer,) = model.execute([good])
    assert refused(answer) == (TritonError.INTERNAL, "internal error (IndexError): a bug of ours")


def test_item_index_refuses_other_than_one_finite_embedding_of_its_width(pb_utils, monkeypatch,
                                                                         tmp_path: Path) -> None:
    module = python_model("item_index", pb_utils, monkeypatch)
    layout = {"sparse_item": [1], "sparse_context": [0], "dense_item": [], "dense_context": [0],
              "sparse_names": ["user_id", "item_id"], "dense_names": ["match"]}
    save_index({"embeddings": np.eye(3, dtype=np.float32), "item_ids": np.array(["a", "b", "c"]),
                "item_sparse": np.array([[1], [2], [3]], np.int64), "item_dense": np.zeros((3, 0), np.float32),
                "layout": layout}, tmp_path / "1")
    args = {"model_config": json.dumps({"parameters": {"candidates": {"string_value": "2"}}}),
            "model_repository": str(tmp_path), "model_version": "1"}
    model = module.TritonPythonModel()
    model.initialize(args)

    def req(emb, ctx_sparse=((5,),), ctx_dense=((0.5,),)):
        return Request(user_embedding=np.array(emb, np.float32), context_sparse=np.array(ctx_sparse, np.int64),
                       context_dense=np.array(ctx_dense, np.float32))

    answers = model.execute([req([[0, 1, 0]]), req([[0, 1]]), req([[0, 1, 0], [1, 0, 0]]), req([[np.nan, 1, 0]]),
                             req([[0, 1, 0]], ctx_sparse=[[5, 6]]), req([[0, 1, 0]], ctx_dense=[[np.inf]])])
    assert answers[0].error is None and answers[0].outputs["item_ids"].tolist()[0] == "b"
    np.testing.assert_array_equal(answers[0].outputs["sparse"][0], [5, 2])
    for answer in answers[1:]:
        assert refused(answer)[0] == TritonError.INVALID_ARG
    assert "expected shape [1, 3], got [1, 2]" in refused(answers[1])[1]

    (tmp_path / "1" / "embeddings.npy").unlink()  # a catalog without embeddings: it cannot load as an index
    with pytest.raises(ModelError, match="no item embeddings"):
        module.TritonPythonModel().initialize(args)


# --- the onnxruntime backend ----------------------------------------------------------------------------------------


@pytest.fixture
def backend(pb_utils) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("recserve_onnxruntime_backend", BACKEND)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _graph(path: Path) -> Path:
    """ids [batch, 1] INT64 -> a 5-row table (no OOV clamp, unlike recserve's graphs), concatenated with
    dense [batch, 2] FP32 -> out [batch, 4]."""
    g = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("Flatten", ["e"], ["f"]),
         helper.make_node("Concat", ["f", "dense"], ["out"], axis=1)],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 1]),
              helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.arange(10, dtype=np.float32).reshape(5, 2), "table")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (path / "1").mkdir(parents=True)
    onnx.save(model, path / "1" / "model.onnx")
    return path


@pytest.fixture
def served(backend, tmp_path: Path):
    config = {"max_batch_size": 8, "input": [{"name": "ids"}, {"name": "dense"}], "output": [{"name": "out"}],
              "parameters": {}}
    model = backend.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_repository": str(_graph(tmp_path)),
                      "model_version": "1"})
    return model


def test_input_specs_and_check_inputs(backend, served) -> None:
    specs = backend.input_specs(served.session)
    assert specs == [("ids", np.int64, ["batch", 1]), ("dense", np.float32, ["batch", 2])]
    ids, dense = np.array([[1], [2]]), np.zeros((2, 2), np.float32)
    check = lambda **kw: backend.check_inputs({"ids": ids, "dense": dense, **kw}, specs)  # noqa: E731
    assert check() is None
    assert backend.check_inputs({"ids": ids}, specs) == "input 'dense' is missing"
    assert check(ids=ids.astype(np.int32)) == "input 'ids' has dtype int32, the model takes int64"
    assert check(dense=np.zeros(2, np.float32)).startswith("input 'dense' has 1 dimensions [2]")
    assert check(dense=np.zeros((2, 3), np.float32)) == "input 'dense' has size 3 on axis 1, the model takes 2"
    assert check(dense=np.zeros((3, 2), np.float32)) == \
        "input 'dense' has size 3 on axis 0 ('batch'), but input 'ids' has 2"
    assert check(dense=np.array([[0, np.nan], [0, 0]], np.float32)).endswith("NaN or infinite values; send finite "
                                                                             "features")
    nan = {"ids": ids, "dense": np.full((2, 2), np.inf, np.float32)}
    assert backend.check_inputs(nan, specs, reject_nonfinite=False) is None


def test_run_error_maps_onnxruntimes_invalid_argument_to_invalid_arg(backend) -> None:
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument

    r = backend.run_error(InvalidArgument("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : indices element out of data "
                                          "bounds\nmore"))
    assert r.code == "INVALID_ARG" and r.message.startswith("onnxruntime: [ONNXRuntimeError] : 2 : INVALID_ARGUMENT")
    assert "more" not in r.message
    assert backend.run_error(Fail("x" * 10_000)).code == "INTERNAL"
    assert len(backend.run_error(Fail("x" * 10_000)).message) < backend.MESSAGE_LIMIT + 40
    assert backend.run_error(RuntimeError("")).message == "onnxruntime: RuntimeError"


def test_the_backend_answers_each_request_of_a_batch_with_its_own_status(served, monkeypatch) -> None:
    def req(ids, dense):
        return Request(ids=np.array(ids, np.int64), dense=np.array(dense, np.float32))

    good = req([[1]], [[0.5, 0.25]])
    answers = served.execute([good, req([[2]], [[np.nan, 0]]), req([[7]], [[0, 0]]), req([[3], [4]], [[1, 1], [2, 2]])])
    np.testing.assert_allclose(answers[0].outputs["out"], [[2, 3, 0.5, 0.25]])
    assert refused(answers[1]) == (TritonError.INVALID_ARG,
                                   "input 'dense' has NaN or infinite values; send finite features")
    code, message = refused(answers[2])  # id 7 of a 5-row table, in a graph that does not clamp ids
    assert code == TritonError.INVALID_ARG and "indices element out of data bounds" in message
    np.testing.assert_allclose(answers[3].outputs["out"], [[6, 7, 1, 1], [8, 9, 2, 2]])
    # the merged path: the whole batch run at once, split back per request
    merged = served.execute([good, req([[3], [4]], [[1, 1], [2, 2]])])
    assert [a.outputs["out"].shape for a in merged] == [(1, 4), (2, 4)]

    class Broken:
        def run(self, outputs, feed):
            raise MemoryError("a failure of ours " + "z" * 10_000)

    served.session = Broken()
    (answer,) = served.execute([good])
    code, message = refused(answer)
    assert code == TritonError.INTERNAL and message.startswith("onnxruntime: a failure of ours")
    assert len(message) < 400
