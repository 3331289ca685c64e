"""A python-based Triton backend named ``onnxruntime``: runs ``model.onnx`` with onnxruntime on CPU.

The ``tritonserver`` binary shipped in the nvidia-pytriton wheel has only the python backend, so
recserve puts this file at ``<backend-dir>/onnxruntime/model.py``; Triton then serves every model
whose config says ``backend: "onnxruntime"`` through it. The same config.pbtxt runs on the official
Triton container's real onnxruntime backend. Parameters read from the config (all optional):
``intra_op_thread_count``, ``inter_op_thread_count``, ``reject_nonfinite`` ("true" by default:
a request with NaN or infinite float inputs gets an error instead of a garbage score).

Requests in one ``execute`` call (what the dynamic batcher gathered) are concatenated along the
batch axis and run as one onnxruntime call, then split back per request. A request that fails
validation gets its own error response; the others in the batch are still answered.

Status codes: a request the caller got wrong (an input's dtype or shape against the graph, a NaN or infinite
value, an id onnxruntime refuses as INVALID_ARGUMENT, e.g. out of an embedding table's range) is answered
INVALID_ARG (gRPC INVALID_ARGUMENT); any other failure is ours and answers INTERNAL. Messages are bounded.
This file is copied into the backend directory alone: it imports numpy, onnxruntime and Triton's utils only.
"""

import itertools
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

MESSAGE_LIMIT = 300
"""Characters of an error message sent back (longer ones are cut, saying so)."""

DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
          "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
          "tensor(uint64)": np.uint64, "tensor(uint32)": np.uint32, "tensor(uint16)": np.uint16,
          "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}
"""numpy dtype of an onnxruntime input type (others, e.g. strings, are not checked)."""


class Refusal:
    """A request answered with an error: ``code`` is a name on ``pb_utils.TritonError`` (INVALID_ARG, INTERNAL)."""

    def __init__(self, code, message):
        self.code, self.message = code, bounded(message)


def bounded(text, limit=MESSAGE_LIMIT):
    """``text`` on one line, cut to ``limit`` characters, saying how much was left out."""
    text = str(text).replace("\r", " ").replace("\n", " ")
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def input_specs(session):
    """(name, numpy dtype or None, shape) of each graph input; a shape entry is an int (fixed), a str (a named
    dimension: the same size in every input that names it) or None (any size)."""
    specs = []
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) and d >= 0 else (d if isinstance(d, str) and d else None) for d in i.shape]
        specs.append((i.name, DTYPES.get(i.type), shape))
    return specs


def check_inputs(arrays, specs, reject_nonfinite=True):
    """Why onnxruntime must not run ``arrays`` (the caller's mistake, as a message), or None if it may."""
    named = {}
    for name, dtype, shape in specs:
        if name not in arrays:
            return f"input '{name}' is missing"
        a = arrays[name]
        if dtype is not None and a.dtype != dtype:
            return f"input '{name}' has dtype {a.dtype}, the model takes {np.dtype(dtype)}"
        if a.ndim != len(shape):
            return f"input '{name}' has {a.ndim} dimensions {list(a.shape)}, the model takes {len(shape)}"
        for axis, (got, want) in enumerate(zip(a.shape, shape)):
            if isinstance(want, int) and got != want:
                return f"input '{name}' has size {got} on axis {axis}, the model takes {want}"
            if isinstance(want, str):
                seen = named.setdefault(want, (got, name))
                if seen[0] != got:
                    return (f"input '{name}' has size {got} on axis {axis} ('{want}'), "
                            f"but input '{seen[1]}' has {seen[0]}")
        if reject_nonfinite and a.dtype.kind == "f" and not np.isfinite(a).all():
            return f"input '{name}' has NaN or infinite values; send finite features"
    return None


def run_error(exc):
    """The refusal for an exception onnxruntime raised: INVALID_ARG where onnxruntime says the input is at fault."""
    code = "INVALID_ARG" if type(exc).__name__ == "InvalidArgument" else "INTERNAL"
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return Refusal(code, "onnxruntime: " + lines[0])


def _param(config, key, default):
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    return default if value in (None, "") else value


def _error(refusal):
    code = getattr(pb_utils.TritonError, refusal.code, None)  # a Triton too old for codes gets the message alone
    error = pb_utils.TritonError(refusal.message) if code is None else pb_utils.TritonError(refusal.message, code)
    return pb_utils.InferenceResponse(error=error)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(_param(config, "intra_op_thread_count", 1))
        opts.inter_op_num_threads = int(_param(config, "inter_op_thread_count", 1))
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        self.specs = [s for s in input_specs(self.session) if s[0] in self.inputs]
        self.reject_nonfinite = _param(config, "reject_nonfinite", "true").lower() == "true"
        # Two-tower graphs take two inputs with independent batch axes: never concatenate across requests.
        self.batched = config.get("max_batch_size", 0) > 0 and len(
            {str(i.shape[0]) for i in self.session.get_inputs()}) == 1

    def _check(self, arrays):
        problem = check_inputs(arrays, self.specs, self.reject_nonfinite)
        return None if problem is None else Refusal("INVALID_ARG", problem)

    def _arrays(self, request):
        """The request's arrays by input name, or a Refusal (Triton checks names first: reaching it is a bug)."""
        try:
            by_name = {t.name(): t for t in request.inputs()}  # one pass over the request's inputs
            return {n: by_name[n].as_numpy() for n in self.inputs}
        except Exception as e:
            return Refusal("INTERNAL", f"reading the request's inputs: {type(e).__name__}: {e}")

    def _run(self, feed):
        """Outputs of one request, or the Refusal answering onnxruntime's error."""
        try:
            return self.session.run(self.outputs, feed)
        except Exception as e:  # onnxruntime's own errors: answer the request, keep serving
            return run_error(e)

    def _response(self, outs):
        if isinstance(outs, Refusal):
            return _error(outs)
        # rows of a C-contiguous output are contiguous already: no copies
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, o) for n, o in zip(self.outputs, outs)])

    def _answer(self, feed):
        if isinstance(feed, Refusal):
            return self._response(feed)
        problem = self._check(feed)
        return self._response(problem if problem else self._run(feed))

    def execute(self, requests):
        feeds = [self._arrays(r) for r in requests]
        if self.batched and len(feeds) > 1 and not any(isinstance(f, Refusal) for f in feeds):
            # The common case, checked and run once for the whole batch; any problem (a non-finite
            # value, an onnxruntime error) sends every request down the one-by-one path, where each
            # gets its own answer and one bad request cannot fail the others.
            try:
                merged = {n: np.concatenate([f[n] for f in feeds]) for n in self.inputs}
                outs = None if self._check(merged) else self.session.run(self.outputs, merged)
            except Exception:
                outs = None
            if outs is not None:
                ends = list(itertools.accumulate(len(f[self.inputs[0]]) for f in feeds))
                return [self._response([o[a:b] for o in outs]) for a, b in zip([0] + ends[:-1], ends)]
        return [self._answer(f) for f in feeds]
