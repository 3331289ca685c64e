"""Triton python model: the products nearest a query embedding (``recserve.triton.search``).

Its version directory holds what ``recserve search-index`` wrote: ``embeddings.npy`` (the catalog's titles,
embedded by the same encoder, L2-normalized), ``products.json`` (their ids) and ``terms.npz`` (the titles'
terms). Asked for ``features`` (the ``search`` ensemble with a ranker), it returns the ``rerank_depth``
nearest (at least ``top_k``) with what the ranker sees of each (``recserve.triton.search_features``, which needs
the query's text); otherwise the ``top_k`` nearest. An embedding of the wrong width or with NaN, a query that is
not one UTF-8 text, or a negative ``top_k``, is answered INVALID_ARGUMENT.
"""

import os

import numpy as np
import triton_python_backend_utils as pb_utils

from recserve.errors import InferenceError
from recserve.triton.features import model_parameters
from recserve.triton.search import ProductIndex, query_text
from recserve.triton.validation import error_response


class TritonPythonModel:
    def initialize(self, args):
        self.index = ProductIndex(os.path.join(args["model_repository"], args["model_version"]))
        self.depth = int(model_parameters(args).get("rerank_depth") or 0)

    def execute(self, requests):
        responses = []
        for request in requests:
            get = lambda n, r=request: pb_utils.get_input_tensor_by_name(r, n).as_numpy()  # noqa: E731
            try:
                k = np.asarray(get("top_k")).ravel()
                if k.size != 1 or int(k[0]) < 0:
                    raise InferenceError(f"top_k must be one value >= 0, got {k.tolist()[:4]}")
                k = int(k[0])
                if "features" in request.requested_output_names():
                    items, scores, features = self.index.candidates(query_text(get("query")), get("embedding"),
                                                                    max(k, self.depth))
                else:
                    (items, scores), features = self.index.search(get("embedding"), k), None
            except Exception as e:  # a bad request gets its own error; the model keeps serving
                responses.append(error_response(pb_utils, e))
                continue
            outputs = [pb_utils.Tensor("items", items.astype(np.object_)), pb_utils.Tensor("scores", scores)]
            if features is not None:
                outputs.append(pb_utils.Tensor("features", features))
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses
