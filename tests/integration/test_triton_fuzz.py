"""Fuzzing Triton's KServe v2 gRPC interface (``ModelInfer``) with recserve's models behind it.

The real tritonserver (nvidia-pytriton wheel, CPU) serves the ranker and user tower (recserve's python-based
``onnxruntime`` backend), the item index and the python steps of the ensembles, and the ``recommend`` and
``retrieve`` ensembles. A seeded generator makes well over 1,000 malformed ``ModelInfer`` calls, in kinds: wrong,
missing, extra and duplicated input names; wrong datatypes; wrong ranks and sizes, negative, huge and zero
dimensions; NaN and infinite floats; negative and huge ids; truncated, oversized (up to megabytes), missing and
surplus ``raw_input_contents``; malformed and non-UTF-8 BYTES tensors; unknown models (8 KB+ names included),
unknown and unparseable versions; empty requests; unknown outputs; malformed parameters and typed contents;
and bodies of random or mutated bytes, sent with a bytes serializer. They are fired concurrently (so the
dynamic batcher mixes them with each other and with valid requests).

Every answer is a deliberate one: INVALID_ARGUMENT for what the caller got wrong, NOT_FOUND for a model or
version that does not exist, RESOURCE_EXHAUSTED only for the megabyte-sized bodies, OK where the input is valid
by design (ids outside a vocabulary are the OOV id; a NaN raw feature is a missing value) - never INTERNAL or
UNKNOWN, with one exception Triton owns (see ``UNPARSEABLE``). Afterwards tritonserver and every python stub
are the same processes, live, answering a valid request correctly, and tritonserver's RSS stayed under twice
its size after warm-up.
"""

from __future__ import annotations

import random
import re
import string
import struct
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import triton_fixtures
from triton_fixtures import TrainedModels, ort_run, raw_ranker_rows, running_triton, serving_repo, tritonserver_pids
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from recserve.data.schema import Dataset
from recserve.triton.retrieval import ItemIndex

pytestmark = pytest.mark.slow

triton_models = triton_fixtures.triton_models
ranker_data = triton_fixtures.ranker_data
two_tower_data = triton_fixtures.two_tower_data

SEED = 20240516
CASES_PER_KIND = 50
"""Malformed calls of each generated kind (27 kinds: about 1,400 calls, well over the 1,000 asked for)."""
CONCURRENCY = 16
MIN_MALFORMED = 1000

INVALID = frozenset({"INVALID_ARGUMENT"})
MISSING = frozenset({"NOT_FOUND", "INVALID_ARGUMENT"})
ACCEPTED = frozenset({"OK"})

UNPARSEABLE = "Unable to parse request"
"""Triton's own answer to a body that is not a ModelInferRequest: INTERNAL with exactly this message.

It comes from the gRPC C++ library linked into tritonserver (the string is in the binary), before any Triton or
recserve code sees the request: ``ServerInterface::PayloadAsyncRequest::FinalizeResult`` (grpcpp's
server_interface.h) fails to deserialize the payload and calls ``grpc_call_cancel_with_status(call,
GRPC_STATUS_INTERNAL, "Unable to parse request")``. Nothing recserve ships runs on that path (only a proxy in front
of Triton could answer INVALID_ARGUMENT), so the test asserts the case exactly: only bodies protobuf itself
fails to parse as a ModelInferRequest, only this message."""

MODELS = ("ranker", "user_tower", "item_index", "recommend_preprocess", "recommend_topk", "recommend",
          "retrieve_preprocess", "retrieve")
MUST_BE_FINITE = {"ranker": ["dense"], "item_index": ["user_embedding", "context_dense"], "recommend_topk": ["score"]}
"""Float inputs a NaN or infinity is refused in (the backend's and the python models' checks)."""
MISSING_VALUE = {"recommend_preprocess": ["dense_raw"], "recommend": ["dense_raw"],
                 "retrieve_preprocess": ["context_dense_raw"], "retrieve": ["context_dense_raw"]}
"""Raw float features where NaN and infinity mean 'missing' (the transform's fill value): valid input."""
IDS = {"ranker": ["sparse"], "user_tower": ["user_sparse"], "item_index": ["context_sparse"]}
TEXT = {"recommend_preprocess": ["sparse_raw"], "recommend": ["sparse_raw"],
        "retrieve_preprocess": ["user_raw", "context_raw"], "retrieve": ["user_raw", "context_raw"]}
"""BYTES inputs decoded as UTF-8 text (vocabulary tokens)."""
TOP_K = ("recommend_topk", "recommend", "retrieve")
NUMPY = {"INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "FP64": np.float64, "FP16": np.float16,
         "INT8": np.int8, "UINT8": np.uint8, "INT16": np.int16, "UINT64": np.uint64, "BOOL": np.bool_}
DATATYPES = (*NUMPY, "BYTES")


# --- requests ---------------------------------------------------------------------------------------------------------


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    raw: bytes


def bytes_raw(values) -> bytes:
    """Triton's BYTES wire format: each element as a 4-byte little-endian length and its bytes."""
    out = []
    for v in np.asarray(values, dtype=object).ravel():
        b = v if isinstance(v, bytes) else str(v).encode()
        out.append(struct.pack("<I", len(b)) + b)
    return b"".join(out)


def tensor(name: str, array: np.ndarray) -> Tensor:
    if array.dtype == object:
        return Tensor(name, "BYTES", list(array.shape), bytes_raw(array))
    datatype = next(k for k, v in NUMPY.items() if np.dtype(v) == array.dtype)
    return Tensor(name, datatype, list(array.shape), np.ascontiguousarray(array).tobytes())


def request(model: str, tensors: list[Tensor], version: str = "", raws: list[bytes] | None = None
            ) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name=model, model_version=version)
    for t in tensors:
        r.inputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
    r.raw_input_contents.extend([t.raw for t in tensors] if raws is None else raws)
    return r


def data_of(datatype: str, shape: list[int], rng: random.Random) -> bytes:
    """Well-formed raw contents of a (datatype, shape) tensor: small ids, finite floats, short tokens."""
    n = int(np.prod(shape)) if shape else 1
    if datatype == "BYTES":
        return bytes_raw([f"t{rng.randrange(50)}" for _ in range(n)])
    np_rng = np.random.default_rng(rng.randrange(2**32))
    kind = np.dtype(NUMPY[datatype]).kind
    values = np_rng.integers(0, 3, n) if kind in "iub" else np_rng.normal(size=n)
    return values.astype(NUMPY[datatype]).tobytes()


@dataclass
class Case:
    kind: str
    model: str
    body: pb.ModelInferRequest | bytes
    allowed: frozenset[str]
    check: Callable[[pb.ModelInferResponse], None] | None = None
    """Checks an OK answer."""
    same_as_valid: bool = False
    """An OK answer must be the answer to the model's valid request (where Triton reads the request as that)."""
    outcome: tuple[str, str] = ("", "")
    """(status code name, details) once sent."""
    response: object = field(default=None, repr=False)


# --- the valid requests the malformed ones are made from ---------------------------------------------------------


@dataclass
class Valid:
    feeds: dict[str, dict[str, np.ndarray]]
    repo: Path

    def tensors(self, model: str) -> list[Tensor]:
        return [tensor(n, a) for n, a in self.feeds[model].items()]


def valid_feeds(repo: Path, triton_models: TrainedModels, ranker_data: Dataset, two_tower_data: Dataset) -> Valid:
    t = ranker_data.ranking_test
    sparse, dense = t.sparse[:4], t.dense[:4]
    raw_sparse, raw_dense = raw_ranker_rows(triton_models.ranker / "preprocessing.json", sparse, dense)
    index = ItemIndex(repo / "item_index" / "1")
    n_ctx_sparse, n_ctx_dense = len(index.layout.sparse_context), len(index.layout.dense_context)
    users = two_tower_data.retrieval.user_table[:3]
    (embedding,) = ort_run(repo / "user_tower" / "1" / "model.onnx", {"user_sparse": users[:1]})
    strings = lambda values: np.array(values, dtype=object)  # noqa: E731
    item_ids = strings([f"item-{i}" for i in range(4)])
    top_k = np.array([3], np.int32)
    retrieve = {"user_raw": strings([["u1"]]), "context_raw": strings([["u1", "q1"]]),
                "context_dense_raw": np.zeros((1, n_ctx_dense), np.float32)}
    assert n_ctx_sparse == 2  # the raw context above: user_id and query_id
    return Valid({
        "ranker": {"sparse": sparse, "dense": dense},
        "user_tower": {"user_sparse": users},
        "item_index": {"user_embedding": embedding, "context_sparse": np.ones((1, n_ctx_sparse), np.int64),
                       "context_dense": np.zeros((1, n_ctx_dense), np.float32)},
        "recommend_preprocess": {"sparse_raw": raw_sparse, "dense_raw": raw_dense},
        "recommend_topk": {"score": np.linspace(0, 1, 4, dtype=np.float32).reshape(4, 1), "item_ids": item_ids,
                           "top_k": top_k},
        "recommend": {"sparse_raw": raw_sparse, "dense_raw": raw_dense, "item_ids": item_ids, "top_k": top_k},
        "retrieve_preprocess": retrieve,
        "retrieve": {**retrieve, "top_k": top_k},
    }, repo)


# --- the malformed kinds --------------------------------------------------------------------------------------------


def _name(rng: random.Random, longest: int = 300) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits + "_-./:é漢 ") for _ in range(rng.randrange(1, longest)))


def input_unknown(rng, v: Valid, model: str) -> Case:
    ts = v.tensors(model)
    i = rng.randrange(len(ts))
    ts[i] = replace(ts[i], name=ts[i].name + "_" + _name(rng) if rng.random() < 0.5 else _name(rng))
    return Case("input: unknown name", model, request(model, ts), INVALID)


def input_missing(rng, v: Valid, model: str) -> Case:
    ts = v.tensors(model)
    rng.shuffle(ts)
    return Case("input: missing", model, request(model, ts[:rng.randrange(len(ts))]), INVALID)


def input_extra(rng, v: Valid, model: str) -> Case:
    ts = v.tensors(model)
    dt = rng.choice(DATATYPES)
    ts.insert(rng.randrange(len(ts) + 1), Tensor("extra_" + _name(rng, 40), dt, [2], data_of(dt, [2], rng)))
    return Case("input: extra", model, request(model, ts), INVALID)


def input_duplicated(rng, v: Valid, model: str) -> Case:
    ts = v.tensors(model)
    ts.append(rng.choice(ts))
    return Case("input: duplicated", model, request(model, ts), INVALID)


def datatype_wrong(rng, v: Valid, model: str) -> Case:
    """Another datatype, its contents well-formed for that datatype (so the datatype is what is wrong)."""
    ts = v.tensors(model)
    i = rng.randrange(len(ts))
    t = ts[i]
    if rng.random() < 0.2:
        ts[i] = replace(t, datatype=rng.choice(["", "FOO", "fp32", "INT", "STRING", "TYPE_FP32", _name(rng, 30)]))
    else:
        dt = rng.choice([d for d in DATATYPES if d != t.datatype])
        ts[i] = Tensor(t.name, dt, t.shape, data_of(dt, t.shape, rng))
    return Case("datatype: wrong", model, request(model, ts), INVALID)


def shape_rank(rng, v: Valid, model: str) -> Case:
    """One dimension more or fewer (contents sized for the new shape): Triton checks every input's rank."""
    ts = v.tensors(model)
    i = rng.randrange(len(ts))
    t = ts[i]
    shape = list(t.shape)
    if len(shape) > 1 and rng.random() < 0.5:
        shape.pop(rng.randrange(len(shape)))
    else:
        shape.insert(rng.randrange(len(shape) + 1), rng.choice([1, 2, 3]))
    ts[i] = Tensor(t.name, t.datatype, shape, data_of(t.datatype, shape, rng))
    return Case("shape: wrong rank", model, request(model, ts), INVALID)


def _size_options(model: str, name: str, shape: list[int]) -> list[tuple[int, list[int]]]:
    """(axis, sizes) a dimension of this input can take that make the request invalid: every other size (a
    fixed dimension, rows that do not match the other inputs', a width the vocabularies or the index do not
    have, other than one user), but more rows than max_batch_size (256) for the batched models."""
    options = []
    for axis, size in enumerate(shape):
        if model == "retrieve_preprocess" and name == "user_raw" and axis == 0:
            continue  # valid: the preprocessing step takes any number of users (the ensemble takes one)
        if model in ("ranker", "user_tower") and axis == 0:
            options.append((axis, [257, 300, 1000]))
        else:
            options.append((axis, [s for s in (0, 1, 2, 3, 5, 7) if s != size]))
    return options


def shape_size(rng, v: Valid, model: str) -> Case:
    """One dimension of another size (contents sized for it): a fixed dimension, more rows than the model's
    max_batch_size, rows that do not match the other inputs, a feature width the vocabularies do not have."""
    ts = v.tensors(model)
    choices = [(i, axis, sizes) for i, t in enumerate(ts) for axis, sizes in _size_options(model, t.name, t.shape)]
    i, axis, sizes = rng.choice(choices)
    t = ts[i]
    shape = list(t.shape)
    shape[axis] = rng.choice(sizes)
    if model in ("ranker", "user_tower") and axis == 0:
        ts = [Tensor(u.name, u.datatype, [shape[0], *u.shape[1:]], data_of(u.datatype, [shape[0], *u.shape[1:]], rng))
              for u in ts]  # every input, so the batch is consistent and only too large
    else:
        ts[i] = Tensor(t.name, t.datatype, shape, data_of(t.datatype, shape, rng))
    return Case("shape: wrong size", model, request(model, ts), INVALID)


HUGE = [-1, -2, -(2**31), -(2**63), 2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1]


BATCHED = ("ranker", "user_tower")
"""The models with max_batch_size > 0: Triton takes the first dimension of their inputs as the batch size."""


def triton_reads_the_valid_batch(model: str, valid: list[Tensor], sent: list[Tensor]) -> bool:
    """Whether Triton reads ``sent`` as the valid request: Triton's own leniency, not recserve's.

    Triton keeps a request's batch size in a uint32 (``InferenceRequest::Normalize``: ``batch_size_ =
    input.OriginalShape()[0]``, where 0 means "not set yet", then ``OriginalShape()[0] != batch_size_`` for the
    other inputs) and strips the first dimension before checking the rest. So a batched model's input whose first
    dimension is huge but is 0 or the true batch size modulo 2**32 can pass, depending on which input Triton looks
    at first; the request is then served with the true batch size, exactly as the valid one."""
    if model not in BATCHED:
        return False
    batch = valid[0].shape[0]
    return all(t.shape[1:] == u.shape[1:] and (t.shape[0] == u.shape[0] or t.shape[0] % 2**32 in (0, batch))
               for t, u in zip(sent, valid))


def shape_huge(rng, v: Valid, model: str) -> Case:
    """Negative and huge dimensions (the contents are the valid request's): one input, or every input's rows.
    Refused, except where Triton itself reads the request as the valid one (``triton_reads_the_valid_batch``)."""
    valid = v.tensors(model)
    ts = list(valid)
    if rng.random() < 0.5:
        d = rng.choice(HUGE)
        ts = [replace(t, shape=[d, *t.shape[1:]]) for t in ts]
    else:
        i = rng.randrange(len(ts))
        shape = list(ts[i].shape)
        shape[rng.randrange(len(shape))] = rng.choice(HUGE)
        ts[i] = replace(ts[i], shape=shape)
    if triton_reads_the_valid_batch(model, valid, ts):
        return Case("shape: huge batch dimension Triton truncates to the true one (Triton's uint32 batch size)",
                    model, request(model, ts), INVALID | ACCEPTED, same_as_valid=True)
    return Case("shape: negative or huge", model, request(model, ts), INVALID)


def shape_zero(rng, v: Valid, model: str) -> Case:
    """A zero dimension and empty contents: refused, or an empty answer (no rows is a valid question)."""
    ts = v.tensors(model)
    for i in rng.sample(range(len(ts)), rng.randrange(1, len(ts) + 1)):
        shape = list(ts[i].shape)
        shape[rng.randrange(len(shape))] = 0
        ts[i] = Tensor(ts[i].name, ts[i].datatype, shape, b"")
    return Case("shape: zero-sized", model, request(model, ts), INVALID | ACCEPTED)


def nonfinite(rng, v: Valid, model: str) -> Case:
    """NaN and infinities in a float input the models compute on: INVALID_ARGUMENT, never a garbage answer."""
    feed = {n: a.copy() for n, a in v.feeds[model].items()}
    name = rng.choice(MUST_BE_FINITE[model])
    flat = feed[name].reshape(-1)
    for j in rng.sample(range(flat.size), rng.randrange(1, flat.size + 1)):
        flat[j] = rng.choice([np.nan, np.inf, -np.inf])
    return Case("float: NaN or infinite", model, request(model, [tensor(n, a) for n, a in feed.items()]), INVALID)


def nonfinite_missing(rng, v: Valid, model: str) -> Case:
    """NaN and infinities in a raw feature of an ensemble: a missing value by design (answered OK)."""
    feed = {n: a.copy() for n, a in v.feeds[model].items()}
    flat = feed[rng.choice(MISSING_VALUE[model])].reshape(-1)
    for j in rng.sample(range(flat.size), rng.randrange(1, flat.size + 1)):
        flat[j] = rng.choice([np.nan, np.inf, -np.inf])
    return Case("float: NaN or infinite raw feature (missing by design)", model,
                request(model, [tensor(n, a) for n, a in feed.items()]), ACCEPTED)


def ids_out_of_range(rng, v: Valid, model: str) -> Case:
    """Negative and huge ids: the graphs map ids outside [0, cardinality) to the OOV id 0 (``oov_clamp``), by
    design; the answer must be exactly the answer for OOV ids."""
    feed = {n: a.copy() for n, a in v.feeds[model].items()}
    name = rng.choice(IDS[model])
    flat = feed[name].reshape(-1)
    for j in rng.sample(range(flat.size), rng.randrange(1, flat.size + 1)):
        flat[j] = rng.choice([-1, -2, -(2**31), -(2**63), 10**6, 2**31, 2**62, 2**63 - 1])
    check = None
    if model in ("ranker", "user_tower"):
        oov = {n: np.where((a < 0) | (a >= 10**6), 0, a) if n == name else a for n, a in feed.items()}
        (want,) = ort_run(v.repo / model / "1" / "model.onnx", oov)

        def check(resp: pb.ModelInferResponse, want=want) -> None:
            got = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(want.shape)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    return Case("ids: negative or huge (OOV by design)", model,
                request(model, [tensor(n, a) for n, a in feed.items()]), ACCEPTED, check)


def top_k_negative(rng, v: Valid, model: str) -> Case:
    feed = dict(v.feeds[model])
    feed["top_k"] = np.array([rng.choice([-1, -2, -100, -(2**31)])], np.int32)
    return Case("top_k: negative", model, request(model, [tensor(n, a) for n, a in feed.items()]), INVALID)


def _nonempty(ts: list[Tensor]) -> list[int]:
    return [i for i, t in enumerate(ts) if t.raw]


def raw_truncated(rng, v: Valid, model: str) -> Case:
    ts = v.tensors(model)
    i = rng.choice(_nonempty(ts))
    ts[i] = replace(ts[i], raw=ts[i].raw[:rng.randrange(len(ts[i].raw))])
    return Case("raw_input_contents: truncated", model, request(model, ts), INVALID)


def raw_oversized(rng, v: Valid, model: str) -> Case:
    ts = v.tensors(model)
    i = rng.randrange(len(ts))
    extra = ts[i].raw * rng.randrange(1, 4) if ts[i].raw and rng.random() < 0.3 else rng.randbytes(rng.randrange(1, 65))
    ts[i] = replace(ts[i], raw=ts[i].raw + extra)
    return Case("raw_input_contents: oversized", model, request(model, ts), INVALID)


def raw_megabytes(rng, v: Valid, model: str) -> Case:
    """Megabytes of contents for a small tensor: refused (RESOURCE_EXHAUSTED would be a size limit's answer)."""
    ts = v.tensors(model)
    i = rng.randrange(len(ts))
    ts[i] = replace(ts[i], raw=ts[i].raw + bytes(rng.randrange(1, 5) << 20))
    return Case("raw_input_contents: megabytes", model, request(model, ts), INVALID | {"RESOURCE_EXHAUSTED"})


def raw_missing(rng, v: Valid, model: str) -> Case:
    ts = v.tensors(model)
    raws = [t.raw for t in ts]
    del raws[rng.randrange(len(raws)):]
    return Case("raw_input_contents: fewer than inputs", model, request(model, ts, raws=raws), INVALID)


def raw_surplus(rng, v: Valid, model: str) -> Case:
    """More raw_input_contents than inputs. Triton's own answer: OK, the surplus ignored (it reads the i-th raw
    entry for the i-th input and never looks at the rest). Not INTERNAL, and the answer is the valid request's."""
    ts = v.tensors(model)
    raws = [t.raw for t in ts] + [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.randrange(1, 4))]
    return Case("raw_input_contents: more than inputs (Triton ignores the rest)", model,
                request(model, ts, raws=raws), ACCEPTED, same_as_valid=True)


def bytes_malformed(rng, v: Valid, model: str) -> Case:
    """A BYTES tensor whose length prefixes do not add up: too long, cut inside a prefix, wrong element count."""
    ts = v.tensors(model)
    i = rng.choice([j for j, t in enumerate(ts) if t.datatype == "BYTES"])
    t = ts[i]
    n = int(np.prod(t.shape))
    how = rng.randrange(4)
    if how == 0:
        raw = struct.pack("<I", rng.choice([n + 5, 2**31, 2**32 - 1])) + b"abc"
    elif how == 1:
        raw = t.raw + rng.randbytes(rng.randrange(1, 4))  # a partial length prefix at the end
    elif how == 2:
        raw = bytes_raw([f"x{j}" for j in range(n + rng.choice([-1, 1, 2]))]) if n > 1 else bytes_raw(["a", "b"])
    else:
        raw = rng.randbytes(rng.randrange(1, 40))
    ts[i] = replace(t, raw=raw)
    return Case("BYTES: malformed length prefixes", model, request(model, ts), INVALID)


INVALID_UTF8 = [b"\xff", b"\xfe\xff", b"\xc3", b"\xc3\x28", b"\xe2\x82", b"\xf0\x28\x8c\xbc", b"\xed\xa0\x80",
                b"\x80abc", b"ok\xc0\xaf"]


def bytes_not_utf8(rng, v: Valid, model: str) -> Case:
    feed = dict(v.feeds[model])
    name = rng.choice(TEXT[model])
    values = feed[name].copy()
    flat = values.reshape(-1)
    for j in rng.sample(range(flat.size), rng.randrange(1, flat.size + 1)):
        flat[j] = rng.choice(INVALID_UTF8) + rng.choice([b"", b"x", b"abc"])  # no suffix that could complete it
    feed[name] = values
    return Case("BYTES: not UTF-8 text", model, request(model, [tensor(n, a) for n, a in feed.items()]), INVALID)


def model_unknown(rng, v: Valid, model: str) -> Case:
    name = _name(rng, 40) if rng.random() < 0.5 else _name(rng, 300) if rng.random() < 0.5 else \
        _name(rng, 2) * (8200 + rng.randrange(4000))  # over 8 KB
    if name in MODELS:
        name += "_x"
    return Case("model: unknown (8 KB+ names included)", name, request(name, v.tensors(model)),
                frozenset({"NOT_FOUND"}))


def stol(text: str) -> int | None:
    """What C++ ``std::stol`` makes of ``text`` (Triton's parse of a request's model_version): the leading integer
    after white space, the rest ignored; None where it throws (no digits, or out of the int64 range)."""
    m = re.match(r"[ \t\n\v\f\r]*([+-]?[0-9]+)", text)
    if m is None or not -(2**63) <= int(m.group(1)) < 2**63:
        return None
    return int(m.group(1))


def version_unknown(rng, v: Valid, model: str) -> Case:
    """A version the model does not have, or that is no integer: NOT_FOUND or INVALID_ARGUMENT. Triton parses the
    version with ``std::stol``, so strings that start with the integer 1 (" 1", "+1", "1.0", "1abc") are version 1:
    Triton's leniency, answered OK, and the answer must be version 1's."""
    version = rng.choice(["0", "-0", "2", "9", str(rng.randrange(3, 10**9)), "99999999999999999999999", "-1", "-9",
                          "abc", "1.0", " 1", "1 ", "01", "1abc", "0x1", "+1", "\u0661", _name(rng, 20)])
    if stol(version) == 1:
        return Case("model: version string std::stol reads as 1 (Triton's parse)", model,
                    request(model, v.tensors(model), version), ACCEPTED, same_as_valid=True)
    return Case("model: unknown or unparseable version", model, request(model, v.tensors(model), version), MISSING)


def request_empty(rng, v: Valid, model: str) -> Case:
    body = rng.choice([pb.ModelInferRequest(), pb.ModelInferRequest(model_name=model),
                       pb.ModelInferRequest(model_name=model, id=_name(rng, 50)),
                       pb.ModelInferRequest(model_name=model, raw_input_contents=[b"\x00" * 8])])
    return Case("request: empty", model, body, MISSING)


def output_unknown(rng, v: Valid, model: str) -> Case:
    body = request(model, v.tensors(model))
    body.outputs.add(name=_name(rng, 60) + "_out")
    return Case("output: unknown name", model, body, INVALID)


def parameters_malformed(rng, v: Valid, model: str) -> Case:
    """Request and tensor parameters of the wrong type or value (shared-memory ones without their region)."""
    body = request(model, v.tensors(model))
    P = pb.InferParameter
    where = rng.randrange(3)
    if where == 0:
        key, value = rng.choice([("sequence_id", P(bool_param=True)), ("sequence_id", P(double_param=1.5)),
                                 ("sequence_start", P(string_param="yes")), ("sequence_end", P(int64_param=1)),
                                 ("priority", P(int64_param=-rng.randrange(1, 10**6))),
                                 ("priority", P(string_param="high")), ("timeout", P(bool_param=True)),
                                 ("timeout", P(string_param="1s"))])
        body.parameters[key].CopyFrom(value)
    elif where == 1:
        key, value = rng.choice([("shared_memory_region", P(string_param=_name(rng, 30))),
                                 ("shared_memory_region", P(int64_param=3)),
                                 ("shared_memory_byte_size", P(int64_param=rng.randrange(-10, 10**6))),
                                 ("shared_memory_offset", P(int64_param=rng.randrange(-10, 10**6)))])
        body.inputs[rng.randrange(len(body.inputs))].parameters[key].CopyFrom(value)
    else:
        out = body.outputs.add(name=rng.choice(["score", "user_embedding", "items", "scores", "sparse", "dense"]))
        key, value = rng.choice([("shared_memory_region", P(string_param=_name(rng, 30))),
                                 ("classification", P(int64_param=-rng.randrange(1, 100))),
                                 ("classification", P(string_param="3"))])
        out.parameters[key].CopyFrom(value)
    return Case("parameters: wrong type or value", model, body, INVALID)


def contents_typed_wrong(rng, v: Valid, model: str) -> Case:
    """``contents`` (typed values) instead of raw bytes: the wrong field, the wrong count, or both fields."""
    body = pb.ModelInferRequest(model_name=model)
    fields = {"INT64": "int64_contents", "INT32": "int_contents", "FP32": "fp32_contents", "BYTES": "bytes_contents"}
    feed = v.feeds[model]
    broken = rng.choice(list(feed))
    how = rng.randrange(3)
    for name, a in feed.items():
        t = tensor(name, a)
        inp = body.inputs.add(name=name, datatype=t.datatype, shape=t.shape)
        values = [v_ if isinstance(v_, bytes) else str(v_).encode() for v_ in a.ravel()] if a.dtype == object \
            else a.ravel().tolist()
        if name == broken and how == 0:  # the field of another type
            other = rng.choice([f for d, f in fields.items() if d != t.datatype])
            getattr(inp.contents, other).extend({"bytes_contents": [b"1"], "fp32_contents": [1.0]}.get(
                other, [1]) * max(1, len(values)))
            continue
        if name == broken and how == 1:  # one value too many or too few
            values = values[:-1] if len(values) > 1 and rng.random() < 0.5 else values + values[:1]
        getattr(inp.contents, fields[t.datatype]).extend(values)
    if how == 2:  # contents and raw_input_contents both
        body.raw_input_contents.extend(t.raw for t in v.tensors(model))
    return Case("contents: typed values that do not fit", model, body, INVALID)


GENERATORS: dict[Callable, tuple[str, ...]] = {
    input_unknown: MODELS, input_missing: MODELS, input_extra: MODELS, input_duplicated: MODELS,
    datatype_wrong: MODELS, shape_rank: MODELS, shape_size: MODELS, shape_huge: MODELS, shape_zero: MODELS,
    nonfinite: tuple(MUST_BE_FINITE), nonfinite_missing: tuple(MISSING_VALUE), ids_out_of_range: tuple(IDS),
    top_k_negative: TOP_K, raw_truncated: MODELS, raw_oversized: MODELS, raw_missing: MODELS,
    raw_surplus: MODELS, bytes_malformed: tuple(m for m in MODELS if m not in ("ranker", "user_tower", "item_index")),
    bytes_not_utf8: tuple(TEXT), model_unknown: MODELS, version_unknown: MODELS, request_empty: MODELS,
    output_unknown: MODELS, parameters_malformed: MODELS, contents_typed_wrong: MODELS,
}
MEGABYTE_CASES = 12


def parses(body: bytes) -> bool:
    try:
        pb.ModelInferRequest.FromString(body)
    except Exception:  # protobuf's DecodeError, or invalid UTF-8 in a string field
        return False
    return True


def body_case(kind: str, model: str, body: bytes) -> Case:
    """A raw body protobuf cannot parse gets Triton's UNPARSEABLE answer (INTERNAL); one it can parse is a request
    like any other: never INTERNAL or UNKNOWN (OK where the bytes still make a valid request)."""
    allowed = frozenset({"INTERNAL"}) if not parses(body) else frozenset({"OK", "INVALID_ARGUMENT", "NOT_FOUND"})
    return Case(kind, model, body, allowed)


def body_random(rng: random.Random) -> Case:
    return body_case("body: random bytes", "", rng.randbytes(rng.choice([0, 1, 2, 5, 17, 100, 1000, 4096])))


def body_mutated(rng: random.Random, v: Valid) -> Case:
    """A valid request's bytes with a few bytes overwritten, or cut short."""
    model = rng.choice(MODELS)
    body = bytearray(request(model, v.tensors(model)).SerializeToString())
    if rng.random() < 0.2:
        del body[rng.randrange(1, len(body)):]
    else:
        for _ in range(rng.randrange(1, 4)):
            body[rng.randrange(len(body))] = rng.randrange(256)
    return body_case("body: mutated valid request", model, bytes(body))


def malformed_cases(v: Valid, seed: int = SEED) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for generate, models in GENERATORS.items():
        for _ in range(CASES_PER_KIND):
            cases.append(generate(rng, v, rng.choice(models)))
    cases += [raw_megabytes(rng, v, rng.choice(MODELS)) for _ in range(MEGABYTE_CASES)]
    cases += [body_random(rng) for _ in range(CASES_PER_KIND)]
    cases += [body_mutated(rng, v) for _ in range(2 * CASES_PER_KIND)]
    rng.shuffle(cases)
    return cases


# --- the server -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, triton_models: TrainedModels) -> Path:
    # a queue delay, so the dynamic batcher merges malformed requests with each other and with valid ones
    return serving_repo(tmp_path_factory.mktemp("fuzz-repo"), triton_models, 2000, 50)


@pytest.fixture(scope="module")
def server(repo: Path):
    yield from running_triton(repo)


@pytest.fixture(scope="module")
def channel(server):
    # Triton echoes an unknown model's whole name in grpc-message: with gRPC's default 8 KB metadata limit, the
    # client itself would fail an 8 KB+ name's NOT_FOUND as RESOURCE_EXHAUSTED ("received metadata size exceeds
    # soft limit"); a larger limit lets the test see Triton's own answer.
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
               ("grpc.max_metadata_size", 1 << 20)]
    with grpc.insecure_channel(server.grpc_url, options=options) as ch:
        yield ch


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


def stub_pids(parent: int) -> set[int]:
    """The python backend's stub processes (one per model instance) of the tritonserver ``parent``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"triton_python_backend_stub" in cmd:
            found.add(int(entry.name))
    return found


def send(channel: grpc.Channel, cases: list[Case]) -> None:
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                request_serializer=lambda body: body if isinstance(body, bytes) else body.SerializeToString(),
                                response_deserializer=pb.ModelInferResponse.FromString)

    def one(case: Case) -> None:
        try:
            case.response = infer(case.body, timeout=60)
            case.outcome = ("OK", "")
        except grpc.RpcError as e:
            case.outcome = (e.code().name, e.details() or "")

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(one, cases))


def valid_cases(v: Valid, n: int) -> list[Case]:
    """Valid requests to every model (the warm-up, and the mix the dynamic batcher merges malformed ones into)."""
    return [Case("valid", m, request(m, v.tensors(m)), ACCEPTED) for m in MODELS for _ in range(n)]


def outputs(resp: pb.ModelInferResponse) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (datatype, shape, raw contents): an ensemble's outputs come in no fixed order."""
    return {o.name: (o.datatype, list(o.shape), raw) for o, raw in zip(resp.outputs, resp.raw_output_contents)}


def bytes_elements(raw: bytes) -> list[bytes]:
    out, at = [], 0
    while at < len(raw):
        (n,) = struct.unpack_from("<I", raw, at)
        out.append(raw[at + 4:at + 4 + n])
        at += 4 + n
    return out


def assert_same_answer(got: pb.ModelInferResponse, want: pb.ModelInferResponse) -> None:
    got_out, want_out = outputs(got), outputs(want)
    assert {n: o[:2] for n, o in got_out.items()} == {n: o[:2] for n, o in want_out.items()}
    for name, (datatype, _, a) in got_out.items():
        b = want_out[name][2]
        if datatype == "FP32":  # rows batched with others may round differently
            np.testing.assert_allclose(np.frombuffer(a, np.float32), np.frombuffer(b, np.float32), rtol=1e-5,
                                       atol=1e-6)
        elif name == "items" and "scores" in want_out:  # the same item wherever its score is no near-tie
            scores = np.frombuffer(want_out["scores"][2], np.float32)
            apart = [bool(np.all(np.abs(np.delete(scores, i) - s) > 1e-5)) for i, s in enumerate(scores)]
            got_items, want_items = bytes_elements(a), bytes_elements(b)
            assert len(got_items) == len(want_items)
            assert [g for g, ok in zip(got_items, apart) if ok] == [w for w, ok in zip(want_items, apart) if ok]
        else:
            assert a == b, name


def describe(case: Case) -> str:
    """What was sent, in short (for a failure's message)."""
    if isinstance(case.body, bytes):
        return f"{len(case.body)} bytes {case.body[:40]!r}"
    b = case.body
    return (f"version {b.model_version[:30]!r}, inputs " + ", ".join(f"{i.name[:30]} {i.datatype[:10]} {list(i.shape)}"
                                                                   for i in b.inputs)
            + f", raw sizes {[len(r) for r in b.raw_input_contents]}")


def report(cases: list[Case]) -> str:
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for c in cases:
        by_kind[c.kind][c.outcome[0]] += 1
    width = max(map(len, by_kind))
    return "\n".join(f"{k:{width}s}  {sum(n.values()):4d}  " + ", ".join(f"{code} {m}" for code, m in sorted(n.items()))
                     for k, n in sorted(by_kind.items()))


# --- the test -------------------------------------------------------------------------------------------------------


def test_the_generator_is_deterministic(repo: Path, triton_models: TrainedModels, ranker_data: Dataset,
                                        two_tower_data: Dataset) -> None:
    v = valid_feeds(repo, triton_models, ranker_data, two_tower_data)
    a, b = malformed_cases(v), malformed_cases(v)
    assert [(c.kind, c.model, c.body if isinstance(c.body, bytes) else c.body.SerializeToString()) for c in a] == \
        [(c.kind, c.model, c.body if isinstance(c.body, bytes) else c.body.SerializeToString()) for c in b]
    assert len(a) >= MIN_MALFORMED
    kinds = Counter(c.kind for c in a)
    assert len(kinds) >= len(GENERATORS) + 3 and sum(kinds.values()) == len(a), kinds
    # both sides of the body rule are exercised: bodies protobuf refuses, and bodies it parses
    bodies = [c for c in a if isinstance(c.body, bytes)]
    assert sum(parses(c.body) for c in bodies) >= 20 and sum(not parses(c.body) for c in bodies) >= 20


def test_malformed_requests_get_deliberate_status_codes_and_triton_keeps_serving(
        server, channel: grpc.Channel, repo: Path, triton_models: TrainedModels, ranker_data: Dataset,
        two_tower_data: Dataset) -> None:
    v = valid_feeds(repo, triton_models, ranker_data, two_tower_data)
    (triton_pid,) = tritonserver_pids(server.settings.grpc_port)
    stubs = stub_pids(triton_pid)
    assert len(stubs) >= 6, stubs  # one per python-backend model instance

    # warm-up: valid requests, then a malformed corpus of another seed (its megabyte bodies raise the allocator's
    # high-water mark once: what is measured after it is what the same traffic leaves behind)
    warm = valid_cases(v, 25)
    send(channel, warm)
    assert all(c.outcome[0] == "OK" for c in warm), Counter(c.outcome for c in warm)
    send(channel, malformed_cases(v, SEED + 1))
    rss_warm = rss_kb(triton_pid)
    stubs_warm = {pid: rss_kb(pid) for pid in stubs}

    cases = malformed_cases(v)
    mixed = cases + valid_cases(v, 10)
    random.Random(SEED + 2).shuffle(mixed)
    start = time.monotonic()
    send(channel, mixed)
    took = time.monotonic() - start
    rss_after = rss_kb(triton_pid)
    print(f"{len(cases)} malformed ModelInfer calls in {took:.1f} s; tritonserver RSS {rss_warm} kB after warm-up, "
          f"{rss_after} kB after\n{report(mixed)}")  # shown with -rP, -s, or on failure

    assert len(cases) >= MIN_MALFORMED
    wrong = [c for c in mixed if c.outcome[0] not in c.allowed]
    assert not wrong, "\n".join(f"{c.kind} ({c.model[:40]}): {c.outcome[0]} {c.outcome[1][:300]!r}, allowed "
                                f"{sorted(c.allowed)}; {describe(c)}" for c in wrong[:20])
    # INTERNAL only as Triton's own answer to a body protobuf cannot parse, with exactly that message; never UNKNOWN
    internal = [c for c in mixed if c.outcome[0] == "INTERNAL"]
    assert all(isinstance(c.body, bytes) and not parses(c.body) and c.outcome[1] == UNPARSEABLE for c in internal)
    assert not [c for c in mixed if c.outcome[0] == "UNKNOWN"]
    # the refusals recserve's models write say why, in a bounded message
    ours = [c for c in mixed if c.kind in ("float: NaN or infinite", "BYTES: not UTF-8 text", "top_k: negative")]
    assert ours and all(c.outcome[0] == "INVALID_ARGUMENT" and 0 < len(c.outcome[1]) <= 400 for c in ours)
    answers = {c.model: c.response for c in warm}
    for c in mixed:
        if c.outcome[0] == "OK" and c.check is not None:
            c.check(c.response)
        if c.outcome[0] == "OK" and c.same_as_valid:
            assert_same_answer(c.response, answers[c.model])

    # no crash: the same tritonserver and stubs, live and ready, the valid requests served right
    assert tritonserver_pids(server.settings.grpc_port) == [triton_pid]
    assert stub_pids(triton_pid) == stubs
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    assert all(stub.ModelReady(pb.ModelReadyRequest(name=m), timeout=10).ready for m in MODELS)
    got = stub.ModelInfer(request("ranker", v.tensors("ranker")), timeout=30)
    (want,) = ort_run(repo / "ranker" / "1" / "model.onnx", v.feeds["ranker"])
    np.testing.assert_allclose(np.frombuffer(got.raw_output_contents[0], np.float32).reshape(want.shape), want,
                               rtol=1e-5, atol=1e-6)
    for m in MODELS:  # every model answers its valid request as it did before the fuzz
        assert_same_answer(stub.ModelInfer(request(m, v.tensors(m)), timeout=30), answers[m])
    assert outputs(answers["recommend"])["items"][1] == [3] and outputs(answers["retrieve"])["items"][1] == [3]
    # bounded memory: malformed requests leave nothing behind in tritonserver or the python stubs
    assert rss_after < 2 * rss_warm, f"tritonserver RSS {rss_warm} kB after warm-up, {rss_after} kB after the fuzz"
    stubs_after = {pid: rss_kb(pid) for pid in stubs}
    assert all(stubs_after[pid] < 2 * stubs_warm[pid] for pid in stubs), (stubs_warm, stubs_after)
