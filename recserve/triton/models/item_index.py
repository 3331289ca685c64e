"""Triton python model: nearest items to a user embedding, as ranker rows.

Its version directory holds the arrays ``recserve index`` wrote (embeddings.npy, items.json,
item_sparse.npy, item_dense.npy, layout.json); the ``candidates`` parameter is how many items
go on to the ranker. A request with other than one finite user embedding of the index's width, or
context columns that do not fit the layout, is answered INVALID_ARGUMENT.
"""

import os

import numpy as np
import triton_python_backend_utils as pb_utils

from recserve.errors import ModelError
from recserve.triton.features import model_parameters
from recserve.triton.retrieval import ItemIndex
from recserve.triton.validation import error_response, require_finite, user_embedding_input


class TritonPythonModel:
    def initialize(self, args):
        directory = os.path.join(args["model_repository"], args["model_version"])
        self.index = ItemIndex(directory)
        if self.index.embeddings is None:  # a `recserve catalog` directory: it cannot answer a search
            raise ModelError(f"{directory} has no item embeddings: build it with `recserve index` to retrieve")
        self.dim = int(self.index.embeddings.shape[1])
        self.candidates = int(model_parameters(args)["candidates"])

    def execute(self, requests):
        responses = []
        for request in requests:
            get = lambda n, r=request: pb_utils.get_input_tensor_by_name(r, n).as_numpy()  # noqa: E731
            try:
                emb = user_embedding_input(get("user_embedding"), self.dim)
                rows, scores = self.index.search(emb, self.candidates)
                sparse, dense = self.index.ranker_rows(
                    rows, get("context_sparse"), require_finite("context_dense", get("context_dense")))
                outputs = [pb_utils.Tensor("sparse", sparse), pb_utils.Tensor("dense", dense),
                           pb_utils.Tensor("item_ids", self.index.item_ids[rows].astype(np.object_)),
                           pb_utils.Tensor("retrieval_scores", scores.astype(np.float32))]
            except Exception as e:  # a bad request gets its own error; the model keeps serving
                responses.append(error_response(pb_utils, e))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses
