"""Triton python model: the top-k candidates by ranker score."""

import numpy as np
import triton_python_backend_utils as pb_utils

from recserve.triton.features import top_k


class TritonPythonModel:
    def initialize(self, args):
        pass

    def execute(self, requests):
        responses = []
        for request in requests:
            scores = pb_utils.get_input_tensor_by_name(request, "score").as_numpy().ravel()
            items = pb_utils.get_input_tensor_by_name(request, "item_ids").as_numpy().ravel()
            k = int(pb_utils.get_input_tensor_by_name(request, "top_k").as_numpy().ravel()[0])
            if len(items) != len(scores):
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"{len(items)} item_ids for {len(scores)} candidate rows")))
                continue
            best = top_k(scores, k)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("items", items[best].astype(np.object_)),
                pb_utils.Tensor("scores", scores[best].astype(np.float32))]))
        return responses
