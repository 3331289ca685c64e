"""Triton python model: raw ranker features -> ids and normalized floats.

Reads ``preprocessing.json`` from the newest version of the ranker model named by the
``ranker_model`` parameter, so vocabularies always match the served ranker. Raw rows of the wrong
width, or sparse values that are not UTF-8 text, are answered INVALID_ARGUMENT (NaN and infinite
raw numbers are missing values: the transform's fill).
"""


import triton_python_backend_utils as pb_utils

from recserve.triton.features import FeatureEncoder, model_parameters, read_columns, sibling_file
from recserve.triton.validation import error_response


class TritonPythonModel:
    def initialize(self, args):
        ranker = model_parameters(args)["ranker_model"]
        path = sibling_file(args["model_repository"], ranker, "preprocessing.json")
        self.encoder = FeatureEncoder.load(path, read_columns(path).get("ranking_sparse"))

    def execute(self, requests):
        responses = []
        for request in requests:
            get = lambda n, r=request: pb_utils.get_input_tensor_by_name(r, n).as_numpy()  # noqa: E731
            try:
                sparse, dense = self.encoder.encode(get("sparse_raw"), get("dense_raw"))
            except Exception as e:  # a bad request gets its own error; the model keeps serving
                responses.append(error_response(pb_utils, e))
                continue
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("sparse", sparse), pb_utils.Tensor("dense", dense)]))
        return responses
