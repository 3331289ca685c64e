"""Triton python model: raw ranker features -> ids and normalized floats.

Reads ``preprocessing.json`` from the newest version of the ranker model named by the
``ranker_model`` parameter, so vocabularies always match the served ranker.
"""

import json

import triton_python_backend_utils as pb_utils

from recserve.triton.features import FeatureEncoder, read_columns, sibling_file


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        ranker = config["parameters"]["ranker_model"]["string_value"]
        path = sibling_file(args["model_repository"], ranker, "preprocessing.json")
        self.encoder = FeatureEncoder.load(path, read_columns(path).get("ranking_sparse"))

    def execute(self, requests):
        responses = []
        for request in requests:
            sparse_raw = pb_utils.get_input_tensor_by_name(request, "sparse_raw").as_numpy()
            dense_raw = pb_utils.get_input_tensor_by_name(request, "dense_raw").as_numpy()
            try:
                sparse, dense = self.encoder.encode(sparse_raw, dense_raw)
            except Exception as e:  # a bad request gets its own error; the model keeps serving
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
                continue
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("sparse", sparse), pb_utils.Tensor("dense", dense)]))
        return responses
