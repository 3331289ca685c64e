"""Triton python model: raw user and context features -> user-tower ids and ranker context columns.

Raw rows of the wrong width, or values that are not UTF-8 text, are answered INVALID_ARGUMENT.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from recserve.triton.features import FeatureEncoder, model_parameters, read_columns, sibling_file
from recserve.triton.retrieval import Layout, context_encoder
from recserve.triton.validation import error_response


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        here = args["model_repository"]
        tower = sibling_file(here, params["user_tower_model"], "preprocessing.json")
        self.user = FeatureEncoder.load(tower, read_columns(tower)["user_sparse"], dense=False)
        ranker = sibling_file(here, params["ranker_model"], "preprocessing.json")
        layout = Layout(**json.loads(sibling_file(here, params["index_model"], "layout.json").read_text()))
        self.context = context_encoder(ranker, layout)

    def execute(self, requests):
        responses = []
        for request in requests:
            get = lambda n, r=request: pb_utils.get_input_tensor_by_name(r, n).as_numpy()  # noqa: E731
            try:
                user_raw = get("user_raw")
                user, _ = self.user.encode(user_raw, np.zeros((len(user_raw), 0)))
                sparse, dense = self.context.encode(get("context_raw"), get("context_dense_raw"))
            except Exception as e:  # a bad request gets its own error; the model keeps serving
                responses.append(error_response(pb_utils, e))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("user_sparse", user), pb_utils.Tensor("context_sparse", sparse),
                pb_utils.Tensor("context_dense", dense)]))
        return responses
