"""The ``search`` path on Triton (issue 19): a typed query -> ``query_tokenize`` (the encoder's fast tokenizer,
Hugging Face ``tokenizers``) -> ``query_encoder`` (the encoder's ONNX graph) -> ``product_index`` (the
products nearest the query's embedding, cosine over the catalog's title embeddings) -> ``items``, ``scores``.

``recserve search-index ENCODER --catalog SPEC`` builds the three models and the ensemble from an encoder
directory (``recserve encoder export`` or a compressed one) and a catalog (the products of search data:
``search:PATH`` or ``synthetic``): the titles are embedded once, here, with the same graph and tokenizer the
server runs. Serving imports numpy, ``tokenizers`` and Triton's utils only.

A query is one text of at most ``MAX_QUERY_BYTES`` UTF-8 bytes, cut at the encoder's token limit; anything
else is answered INVALID_ARGUMENT.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from recserve.errors import InferenceError

EMBEDDINGS, PRODUCTS = "embeddings.npy", "products.json"
MAX_QUERY_BYTES = 2048
"""The longest query accepted (bytes of UTF-8): far beyond what the encoder reads (its token limit)."""


def query_text(raw: np.ndarray) -> str:
    """The one query of a request's ``query`` tensor ([1] or [1, 1] bytes); InferenceError otherwise."""
    values = np.asarray(raw, dtype=object).ravel()
    if values.size != 1:
        raise InferenceError(f"one query per request: input 'query' must hold 1 text, got {values.size}")
    value = values[0]
    if isinstance(value, bytes):
        if len(value) > MAX_QUERY_BYTES:
            raise InferenceError(f"the query is {len(value):,} bytes; at most {MAX_QUERY_BYTES:,}")
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InferenceError(f"the query is not UTF-8 text ({e.reason} at byte {e.start})") from None
    text = str(value)
    if len(text.encode()) > MAX_QUERY_BYTES:
        raise InferenceError(f"the query is longer than {MAX_QUERY_BYTES:,} bytes")
    return text


class ProductIndex:
    """Title embeddings (L2-normalized, float32 [products, dim]) and product ids, from a version directory."""

    def __init__(self, directory: Path):
        directory = Path(directory)
        self.embeddings = np.load(directory / EMBEDDINGS)
        self.product_ids = np.array(json.loads((directory / PRODUCTS).read_text()), dtype=object)
        if self.embeddings.ndim != 2 or len(self.embeddings) != len(self.product_ids):
            raise ValueError(f"{directory}: {EMBEDDINGS} and {PRODUCTS} do not match")

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(product ids, cosines) of the ``k`` products nearest ``query`` ([1, dim] or [dim]), best first."""
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.embeddings.shape[1] or not np.isfinite(q).all():
            raise InferenceError(f"expected one finite embedding of width {self.embeddings.shape[1]}, got {q.shape}")
        scores = self.embeddings @ (q / max(float(np.linalg.norm(q)), 1e-12))
        k = max(0, min(int(k), len(scores)))
        if k == 0:
            return self.product_ids[:0], scores[:0]
        part = np.argpartition(-scores, k - 1)[:k]
        order = part[np.argsort(-scores[part], kind="stable")]
        return self.product_ids[order], scores[order].astype(np.float32)


def build_search(encoder: Path, catalog: str, repository: Path, *, seed: int = 0) -> list[Path]:
    """New versions of ``query_encoder``, ``query_tokenize`` and ``product_index``, and the ``search`` ensemble."""
    from recserve.converters.repository import add_version
    from recserve.converters.triton_config import to_pbtxt
    from recserve.data.search import load_search
    from recserve.encoder.artifact import FILES, load_info
    from recserve.encoder.evaluate import Encoder
    from recserve.triton.ensembles import python_model_shim, search_configs

    info = load_info(encoder)
    data = load_search(catalog, seed)
    embeddings = Encoder(encoder).embed(data.titles, batch=128)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True).clip(1e-12)
    tokenize, encoder_cfg, index, ensemble = search_configs(info.dim)
    written = [add_version(repository, encoder_cfg, {f: (Path(encoder) / f).read_bytes() for f in FILES})]
    for cfg in (tokenize, index):
        written.append(add_version(repository, cfg, {"model.py": python_model_shim(cfg.name).encode()}))
    np.save(written[-1] / EMBEDDINGS, embeddings.astype(np.float32))
    (written[-1] / PRODUCTS).write_text(json.dumps(list(data.product_ids)))
    ens_dir = Path(repository) / ensemble.name
    (ens_dir / "1").mkdir(parents=True, exist_ok=True)
    (ens_dir / "config.pbtxt").write_text(to_pbtxt(ensemble))
    return [*written, ens_dir]
