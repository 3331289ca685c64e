"""Symmetric per-row integer quantization of a float table: the compressed embedding tables
(``recserve.converters.embeddings``) and the product index's INT8 scan (``recserve.triton.search``). numpy only:
both the compression stack and the serving runtime import it."""

from __future__ import annotations

import numpy as np


def quantize_rows(table: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row quantization: (int values in [-2^(b-1)+1, 2^(b-1)-1], fp16 scales [V,1])."""
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(table).max(axis=1, keepdims=True).astype(np.float32) / qmax
    scale = np.where(scale == 0, 1.0, scale).astype(np.float16)
    q = np.clip(np.round(table / scale.astype(np.float32)), -qmax, qmax).astype(np.int8)
    return q, scale
