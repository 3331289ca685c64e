"""INT8 dynamic quantization of an exported encoder (onnxruntime's ``quantize_dynamic``).

The weights of every MatMul (the attention projections and the feed-forward layers: ~80% of the
transformer's compute) and of the token embedding table (the Gather: most of the bytes) are stored as
INT8 with one scale per output channel; MatMul inputs are quantized at run time from each batch's own
range, so no calibration data is needed. LayerNorm, Softmax, GELU and the pooling stay float32: they
normalize over a row whose range changes with every text, where one INT8 scale would cut off either the
peaks or the resolution, and they cost little. The result is a new encoder directory (same tokenizer)
whose ``encoder.json`` records its agreement with the float graph on the export's check texts.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from recserve.encoder.artifact import FILES, INFO_FILE, INPUTS, MODEL_FILE, TOKENIZER_FILE, Parity, load_info
from recserve.encoder.export import CHECK_TEXTS, ExportResult, _write
from recserve.encoder.text import TextTokenizer
from recserve.onnxrt import session
from recserve.outdir import check_out

OPS = ["MatMul", "Gather"]
"""What INT8 stores (see the module's docstring); everything else stays float32."""


def quantize_int8(src: Path, out: Path, *, force: bool = False) -> ExportResult:
    """The encoder at ``src`` with INT8 weights, written to ``out`` (new or empty; ``force``: an earlier one)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    info = load_info(src)
    check_out(out, force, FILES, "recserve encoder quantize")
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / MODEL_FILE
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # its advice to pre-process is for static quantization's calibration
        try:
            quantize_dynamic(Path(src) / MODEL_FILE, target, weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=OPS)
        finally:
            root.setLevel(level)
        data = target.read_bytes()
    tok = TextTokenizer.of(src, info)
    texts = list(CHECK_TEXTS)
    feed = dict(zip(INPUTS, tok.encode(texts)))
    want = session((Path(src) / MODEL_FILE).read_bytes()).run(None, feed)[0]
    got = session(data).run(None, feed)[0]
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)).clip(1e-12)
    quantized = info.model_copy(update={
        "source": str(Path(src).resolve()), "compression": [*info.compression, "int8-dynamic"],
        "parity": Parity(texts=len(texts), max_abs_diff=float(np.abs(got - want).max()), min_cosine=float(cos.min()))})
    _write(out, {MODEL_FILE: data, TOKENIZER_FILE: (Path(src) / TOKENIZER_FILE).read_bytes(),
                 INFO_FILE: (quantized.model_dump_json(indent=2) + "\n").encode()})
    return ExportResult(out, quantized, len(data))
