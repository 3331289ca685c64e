"""How weights are stored on disk: pruned (mostly zero) initializers as ONNX sparse initializers.

onnxruntime reads sparse initializers (values plus int64 linear indices) and densifies them at
load, so a pruned model really shrinks on disk and in transit. Each kept value costs its own bytes
plus an 8-byte index: a float32 weight pays only beyond 2/3 zeros, an INT8 one never. TensorRT
does not read sparse initializers, so builds for it densify first (:func:`densify`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

MIN_ELEMENTS = 256
"""Smaller initializers (biases, scales) are left as they are."""
INDEX_BYTES = 8


def sparse_bytes(values: np.ndarray) -> int:
    return int(np.count_nonzero(values)) * (values.dtype.itemsize + INDEX_BYTES)


def pack_sparse(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """A copy of ``model`` with every initializer stored sparse where that is smaller; and what was done."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep, packed = [], {}
    zeros = 0
    for t in out.graph.initializer:
        a = numpy_helper.to_array(t) if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) else None
        if a is None or a.size < MIN_ELEMENTS:
            keep.append(t)
            continue
        nz = np.flatnonzero(a.ravel())
        zeros += a.size - len(nz)
        if sparse_bytes(a) >= 0.9 * a.nbytes:
            keep.append(t)
            continue
        values = numpy_helper.from_array(a.ravel()[nz], t.name)
        indices = numpy_helper.from_array(nz.astype(np.int64), f"{t.name}_indices")
        out.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(a.shape)))
        packed[t.name] = {"zeros": round(1 - len(nz) / a.size, 4), "dense_bytes": a.nbytes, "sparse_bytes": sparse_bytes(a)}
    if packed:
        del out.graph.initializer[:]
        out.graph.initializer.extend(keep)
        return out, {"sparse_initializers": packed,
                     "bytes_saved": sum(p["dense_bytes"] - p["sparse_bytes"] for p in packed.values())}
    return model, {"sparse_initializers": {}, "zero_weights": zeros}


def densify(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its sparse initializers stored dense again (for TensorRT); ``model`` itself when it has none."""
    if not len(model.graph.sparse_initializer):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for sp in out.graph.sparse_initializer:
        values = numpy_helper.to_array(sp.values)
        dense = np.zeros(int(np.prod(sp.dims)), dtype=values.dtype)
        dense[numpy_helper.to_array(sp.indices).ravel()] = values
        out.graph.initializer.append(numpy_helper.from_array(dense.reshape(tuple(sp.dims)), sp.values.name))
    del out.graph.sparse_initializer[:]
    return out


def storage_note(details: dict[str, Any], pruned: bool) -> dict[str, Any]:
    """The report's ``storage`` entry: what was stored sparse, or, after pruning, why the file did not shrink."""
    if details.get("sparse_initializers"):
        return details
    if not pruned:
        return {"sparse_initializers": {}}
    return {"sparse_initializers": {}, "note": (
        "the pruned weights stay dense and the file did not shrink: a sparse initializer keeps an 8-byte index "
        "per kept value, which pays only beyond 2/3 zeros for float32 weights and never for INT8 ones")}
