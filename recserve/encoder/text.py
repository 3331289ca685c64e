"""Text to the encoder's inputs with Hugging Face ``tokenizers`` (the fast tokenizer the model ships in
``tokenizer.json``): the same ids wherever the encoder runs (export check, Triton, the router's edge).
Imports neither torch nor transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recserve.encoder.artifact import TOKENIZER_FILE, EncoderInfo, load_info
from recserve.errors import ModelError


class TextTokenizer:
    """``encode(texts)`` -> (input_ids, attention_mask), int64 [batch, longest text in tokens], each text cut
    at ``max_seq_length`` tokens ([CLS] and [SEP] included) and padded with the model's pad token."""

    def __init__(self, tokenizer_json: Path, max_seq_length: int):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # tokenizers raises its own untyped errors
            raise ModelError(f"cannot read the tokenizer {tokenizer_json}: {str(e).splitlines()[0]}") from e
        self.max_seq_length = max_seq_length
        self.tokenizer.enable_truncation(max_seq_length)
        pad = self.tokenizer.padding or {}
        self.tokenizer.enable_padding(pad_id=pad.get("pad_id", 0), pad_token=pad.get("pad_token", "[PAD]"))

    @classmethod
    def of(cls, directory: Path, info: EncoderInfo | None = None) -> TextTokenizer:
        """The tokenizer of an exported encoder."""
        info = info or load_info(directory)
        return cls(Path(directory) / TOKENIZER_FILE, info.max_seq_length)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        batch = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in batch], dtype=np.int64).reshape(len(batch), -1)
        mask = np.array([e.attention_mask for e in batch], dtype=np.int64).reshape(len(batch), -1)
        return ids, mask
