"""What ``recserve encoder export`` writes, and reads back: the artifact every later step (compression,
the Triton tokenizer model, the router's edge encoder) starts from. Imports neither torch nor
sentence-transformers: the serving runtime reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from recserve.errors import ModelError

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
INFO_FILE = "encoder.json"
FILES = (MODEL_FILE, TOKENIZER_FILE, INFO_FILE)
INPUTS = ("input_ids", "attention_mask")
"""The graph's inputs: int64 [batch, sequence], both axes dynamic, as the tokenizer pads a batch."""
OUTPUT = "embedding"
"""The graph's output: float32 [batch, dim], pooled (and normalized where the model normalizes)."""


class Parity(BaseModel):
    """How the ONNX graph compared with the PyTorch model on real text before it was written."""

    model_config = ConfigDict(extra="forbid")

    texts: int = Field(description="texts compared, in batches of mixed lengths")
    max_abs_diff: float = Field(description="largest difference of one embedding value")
    min_cosine: float = Field(description="lowest cosine between an ONNX and a PyTorch embedding")


class EncoderInfo(BaseModel):
    """``encoder.json``: what a server needs to feed the graph and what the export measured."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="the sentence-transformers directory exported (or the packaged model's name)")
    dim: int = Field(gt=0, description="embedding width")
    layers: int = Field(ge=0, description="transformer layers")
    parameters: int = Field(ge=0, description="weights in the graph")
    max_seq_length: int = Field(gt=0, description="tokens per text, [CLS] and [SEP] included; longer texts are cut")
    pooling: Literal["mean", "cls"] = Field(description="how token states become one vector")
    normalize: bool = Field(description="whether the embedding is L2-normalized inside the graph")
    do_lower_case: bool = Field(False, description="the model's own flag; the tokenizer's normalizer applies it")
    opset: int = Field(description="ONNX opset of the graph")
    compression: list[str] = Field(default_factory=list, description="what was done to the exported graph, in order")
    parity: Parity = Field(description="agreement with the model it came from: PyTorch for an export, the float "
                                       "graph for a quantized one")


def load_info(directory: Path) -> EncoderInfo:
    """The ``encoder.json`` of an exported encoder; ModelError when ``directory`` is not one."""
    path = Path(directory) / INFO_FILE
    missing = [f for f in FILES if not (Path(directory) / f).is_file()]
    if missing:
        raise ModelError(f"{directory} is not an exported encoder (no {', '.join(missing)}); "
                         "write one with `recserve encoder export --out DIR`")
    try:
        return EncoderInfo.model_validate_json(path.read_text())
    except ValueError as e:
        raise ModelError(f"{path} is not a valid encoder.json: {str(e).splitlines()[0]}") from e
