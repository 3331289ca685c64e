"""Triton python model: nearest items to a user embedding, as ranker rows.

Its version directory holds the arrays ``recserve index`` wrote (embeddings.npy, items.json,
item_sparse.npy, item_dense.npy, layout.json); the ``candidates`` parameter is how many items
go on to the ranker.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from recserve.triton.retrieval import ItemIndex


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.index = ItemIndex(os.path.join(args["model_repository"], args["model_version"]))
        self.candidates = int(config["parameters"]["candidates"]["string_value"])

    def execute(self, requests):
        responses = []
        for request in requests:
            get = lambda n, r=request: pb_utils.get_input_tensor_by_name(r, n).as_numpy()  # noqa: E731
            try:
                emb = get("user_embedding")
                if emb.shape[0] != 1:
                    raise ValueError(f"one user per request, got {emb.shape[0]}")
                rows, scores = self.index.search(emb[0], self.candidates)
                sparse, dense = self.index.ranker_rows(rows, get("context_sparse"), get("context_dense"))
            except Exception as e:  # a bad request gets its own error; the model keeps serving
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("sparse", sparse), pb_utils.Tensor("dense", dense),
                pb_utils.Tensor("item_ids", self.index.item_ids[rows].astype(np.object_)),
                pb_utils.Tensor("retrieval_scores", scores.astype(np.float32))]))
        return responses
