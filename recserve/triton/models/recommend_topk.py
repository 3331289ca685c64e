"""Triton python model: the top-k candidates by ranker score.

A request that does not fit (item ids not one per score, a non-finite score, a negative ``top_k``) is answered
INVALID_ARGUMENT; see :mod:`recserve.triton.validation`.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from recserve.triton.features import top_k
from recserve.triton.validation import error_response, top_k_inputs


class TritonPythonModel:
    def initialize(self, args):
        pass

    def execute(self, requests):
        responses = []
        for request in requests:
            get = lambda n, r=request: pb_utils.get_input_tensor_by_name(r, n).as_numpy()  # noqa: E731
            try:
                scores, items, k = top_k_inputs(get("score"), get("item_ids"), get("top_k"))
                best = top_k(scores, k)
                outputs = [pb_utils.Tensor("items", items[best].astype(np.object_)),
                           pb_utils.Tensor("scores", scores[best].astype(np.float32))]
            except Exception as e:  # a bad request gets its own error; the model keeps serving
                responses.append(error_response(pb_utils, e))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses
