"""Triton python model: one typed query -> the encoder's ``input_ids`` and ``attention_mask`` ([1, tokens]).

The tokenizer is the ``tokenizer.json`` of the newest version of the encoder model it names (parameter
``encoder_model``): the one the encoder was exported or compressed with. A query that is not one UTF-8 text
of bounded length is answered INVALID_ARGUMENT (``recserve.triton.search.query_text``).
"""


import triton_python_backend_utils as pb_utils

from recserve.encoder.artifact import EncoderInfo
from recserve.encoder.text import TextTokenizer
from recserve.triton.features import model_parameters, sibling_file
from recserve.triton.search import query_text
from recserve.triton.validation import error_response


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        here, encoder = args["model_repository"], params["encoder_model"]
        info = EncoderInfo.model_validate_json(sibling_file(here, encoder, "encoder.json").read_text())
        self.tokenizer = TextTokenizer(sibling_file(here, encoder, "tokenizer.json"), info.max_seq_length)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                text = query_text(pb_utils.get_input_tensor_by_name(request, "query").as_numpy())
                ids, mask = self.tokenizer.encode([text])
            except Exception as e:  # a bad request gets its own error; the model keeps serving
                responses.append(error_response(pb_utils, e))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("input_ids", ids), pb_utils.Tensor("attention_mask", mask)]))
        return responses
