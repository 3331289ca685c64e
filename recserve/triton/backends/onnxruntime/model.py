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
"""

import itertools
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def _param(config, key, default):
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    return default if value in (None, "") else value


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
        self.reject_nonfinite = _param(config, "reject_nonfinite", "true").lower() == "true"
        # Two-tower graphs take two inputs with independent batch axes: never concatenate across requests.
        self.batched = config.get("max_batch_size", 0) > 0 and len(
            {str(i.shape[0]) for i in self.session.get_inputs()}) == 1

    def _check(self, arrays):
        if self.reject_nonfinite:
            for name, a in arrays.items():
                if a.dtype.kind == "f" and not np.isfinite(a).all():
                    return f"input '{name}' has NaN or infinite values; send finite features"
        return None

    def _arrays(self, request):
        by_name = {t.name(): t for t in request.inputs()}  # one pass over the request's inputs
        return {n: by_name[n].as_numpy() for n in self.inputs}

    def _run(self, feed):
        """Outputs of one request, or the error message onnxruntime gave."""
        try:
            return self.session.run(self.outputs, feed)
        except Exception as e:  # onnxruntime's own errors: answer the request, keep serving
            return "onnxruntime: " + str(e).splitlines()[0][:300]

    def _response(self, outs):
        if isinstance(outs, str):
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(outs))
        # rows of a C-contiguous output are contiguous already: no copies
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, o) for n, o in zip(self.outputs, outs)])

    def _answer(self, arrays):
        problem = self._check(arrays)
        return self._response(problem if problem else self._run(arrays))

    def execute(self, requests):
        feeds = [self._arrays(r) for r in requests]
        if self.batched and len(feeds) > 1:
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
