"""Triton python model: the ``top_k`` products nearest a query embedding (``recserve.triton.search``).

Its version directory holds what ``recserve search-index`` wrote: ``embeddings.npy`` (the catalog's titles,
embedded by the same encoder, L2-normalized) and ``products.json`` (their ids). An embedding of the wrong
width or with NaN, or a negative ``top_k``, is answered INVALID_ARGUMENT.
"""

import os

import numpy as np
import triton_python_backend_utils as pb_utils

from recserve.errors import InferenceError
from recserve.triton.search import ProductIndex
from recserve.triton.validation import error_response


class TritonPythonModel:
    def initialize(self, args):
        self.index = ProductIndex(os.path.join(args["model_repository"], args["model_version"]))

    def execute(self, requests):
        responses = []
        for request in requests:
            get = lambda n, r=request: pb_utils.get_input_tensor_by_name(r, n).as_numpy()  # noqa: E731
            try:
                k = np.asarray(get("top_k")).ravel()
                if k.size != 1 or int(k[0]) < 0:
                    raise InferenceError(f"top_k must be one value >= 0, got {k.tolist()[:4]}")
                items, scores = self.index.search(get("embedding"), int(k[0]))
            except Exception as e:  # a bad request gets its own error; the model keeps serving
                responses.append(error_response(pb_utils, e))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("items", items.astype(np.object_)), pb_utils.Tensor("scores", scores)]))
        return responses
