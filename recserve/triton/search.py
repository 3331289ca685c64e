"""The ``search`` path on Triton (issue 19): a typed query -> ``query_tokenize`` (the encoder's fast tokenizer,
Hugging Face ``tokenizers``) -> ``query_encoder`` (the encoder's ONNX graph) -> ``product_index`` (the
products nearest the query's embedding, cosine over the catalog's title embeddings, and what the ranker sees
of each: :mod:`recserve.triton.search_features`) -> ``search_ranker`` (an ONNX graph trained on the catalog's
judged queries, :mod:`recserve.models.search_ranker`) -> ``search_topk`` -> ``items``, ``scores``.

``recserve search-index ENCODER --catalog SPEC`` builds the models and the ensemble from an encoder
directory (``recserve encoder export`` or a compressed one) and search data (``search:PATH`` or
``synthetic``): the titles are embedded once, here, with the same graph and tokenizer the server runs; the
ranker learns from the tuning queries' judgments. When it does not beat the encoder's own order on the
validation queries (or with ``--no-ranker``) the ensemble ends at ``product_index``, whose ``scores`` are then
the cosines. Serving imports numpy, ``tokenizers`` and Triton's utils only.

A query is one text of at most ``MAX_QUERY_BYTES`` UTF-8 bytes, cut at the encoder's token limit; anything
else is answered INVALID_ARGUMENT.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from recserve.errors import ConfigError, InferenceError
from recserve.rowwise import quantize_rows
from recserve.triton.search_features import TERMS_FILE, TitleTerms

if TYPE_CHECKING:
    from recserve.models.search_ranker import SearchRankerReport

EMBEDDINGS, PRODUCTS = "embeddings.npy", "products.json"
RANKER_FILE = "search_ranker.json"
"""In a ``search_ranker`` version directory: what the ranker was trained on and how it measured
(:class:`recserve.models.search_ranker.SearchRankerReport`); the edge reads its ``depth``."""
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


ROW_BITS = 7
"""The INT8 rows use -63..63: x86 CPUs without VNNI multiply uint8 by int8 in pairs summed into int16, which
saturates for 255 x 127 x 2 (onnxruntime's ``reduce_range`` for the same reason); 255 x 63 x 2 fits."""


def scan_graph(embeddings: np.ndarray):
    """An ONNX graph: ``query`` [1, dim] float32 and ``k`` [1] int64 -> the ``k`` rows of highest approximate
    cosine (``rows`` [k]), scanning an INT8 copy of ``embeddings`` (one scale per row, symmetric, ``ROW_BITS``;
    the query quantized per call, uint8): a quarter of the bytes a float32 scan reads, in onnxruntime's integer
    kernels."""
    from onnx import TensorProto, helper, numpy_helper

    quantized, scale = quantize_rows(embeddings, ROW_BITS)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["query"], ["q", "q_scale", "q_zero"]),
             helper.make_node("MatMulInteger", ["q", "table", "q_zero"], ["dots"]),
             helper.make_node("Cast", ["dots"], ["dots_f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["dots_f", "scale"], ["scaled"]),
             helper.make_node("Reshape", ["scaled", "flat"], ["scores"]),
             helper.make_node("TopK", ["scores", "k"], ["best", "rows"])]
    graph = helper.make_graph(
        nodes, "product_scan", [helper.make_tensor_value_info("query", TensorProto.FLOAT, [1, embeddings.shape[1]]),
                                helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("rows", TensorProto.INT64, ["k"])],
        [numpy_helper.from_array(np.ascontiguousarray(quantized.T), "table"),
         numpy_helper.from_array(scale.astype(np.float32).T, "scale"), numpy_helper.from_array(np.array([-1], np.int64), "flat")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="recserve")
    model.ir_version = 8
    return model


class ProductIndex:
    """Title embeddings (L2-normalized, float32 [products, dim]), product ids and, when the index has them, the
    titles' terms (:class:`~recserve.triton.search_features.TitleTerms`), from a version directory.

    The nearest products are found in two steps: an INT8 scan of the whole catalog (:func:`scan_graph`) keeps
    the ``SHORTLIST`` best (at least), and their exact float32 cosines order them. An INT8 cosine is within
    about 0.01 of the exact one, far less than what separates the k-th product from the shortlist's last, so the
    answer is the exact top k (a catalog no larger than the shortlist is scored exactly)."""

    SHORTLIST = (4, 128)
    """The scan keeps max(4 k, k + 128) rows."""

    def __init__(self, directory: Path, threads: int = 2):
        directory = Path(directory)
        self.embeddings = np.load(directory / EMBEDDINGS)
        self.product_ids = np.array(json.loads((directory / PRODUCTS).read_text()), dtype=object)
        if self.embeddings.ndim != 2 or len(self.embeddings) != len(self.product_ids):
            raise ValueError(f"{directory}: {EMBEDDINGS} and {PRODUCTS} do not match")
        self.terms = TitleTerms.load(directory) if (directory / TERMS_FILE).exists() else None
        if self.terms is not None and len(self.terms) != len(self.product_ids):
            raise ValueError(f"{directory}: {TERMS_FILE} and {PRODUCTS} do not match")
        from recserve.onnxrt import session

        self.scan = session(scan_graph(self.embeddings), threads) if len(self.embeddings) else None

    def nearest(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(catalog rows, cosines) of the ``k`` products nearest ``query`` ([1, dim] or [dim]), best first."""
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.embeddings.shape[1] or not np.isfinite(q).all():
            raise InferenceError(f"expected one finite embedding of width {self.embeddings.shape[1]}, got {q.shape}")
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        k = max(0, min(int(k), len(self.embeddings)))
        if k == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        times, extra = self.SHORTLIST
        shortlist = max(times * k, k + extra)
        if shortlist >= len(self.embeddings):
            rows = np.arange(len(self.embeddings))
        else:
            (rows,) = self.scan.run(None, {"query": q[None], "k": np.array([shortlist], np.int64)})
        scores = self.embeddings[rows] @ q
        best = np.argsort(-scores, kind="stable")[:k]
        return rows[best].astype(np.int64), scores[best].astype(np.float32)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(product ids, cosines) of the ``k`` products nearest ``query``, best first."""
        rows, scores = self.nearest(query, k)
        return self.product_ids[rows], scores

    def candidates(self, text: str, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(product ids, cosines, ranker features) of the ``k`` products nearest ``query`` (the embedding of
        ``text``)."""
        if self.terms is None:
            raise ValueError("this product index has no title terms (terms.npz): rebuild it with "
                             "`recserve search-index`")
        rows, scores = self.nearest(query, k)
        return self.product_ids[rows], scores, self.terms.features(text, rows, scores)


@dataclass
class SearchBuild:
    """What ``recserve search-index`` wrote: the model directories, and the ranker's report (None: ``--no-ranker``)."""

    written: list[Path]
    ranker: SearchRankerReport | None


AGREEMENT = 0.5
"""The least mean cosine between the query encoder's and the catalog encoder's embeddings of the same titles:
below it they do not share a space (the query encoder was not distilled from the catalog's)."""


def build_search(encoder: Path, catalog: str, repository: Path, *, ranker: bool = True, depth: int = 100,
                 catalog_encoder: Path | None = None, seed: int = 0,
                 progress: Callable[[str], None] = lambda what: None) -> SearchBuild:
    """New versions of ``query_encoder``, ``query_tokenize``, ``product_index`` and, with a ranker that beats the
    encoder's order on the validation queries, ``search_ranker`` and ``search_topk``; and the ``search``
    ensemble chaining them. ``catalog_encoder`` (the encoder ``encoder`` was distilled from) embeds the titles
    instead of ``encoder``: once, here, so its size and speed do not matter. Everything is computed before
    anything is written."""
    from recserve.converters.repository import add_version, check_fits
    from recserve.converters.triton_config import to_pbtxt
    from recserve.data.search import load_search
    from recserve.encoder.artifact import FILES, load_info
    from recserve.encoder.evaluate import Encoder
    from recserve.models.search_ranker import fit_search_ranker
    from recserve.triton.ensembles import python_model_shim, search_configs

    info = load_info(encoder)
    data = load_search(catalog, seed)
    enc = Encoder(encoder)
    titles_by = enc
    if catalog_encoder is not None:
        titles_by = Encoder(catalog_encoder)
        if titles_by.info.dim != info.dim:
            raise ConfigError(f"--catalog-encoder {catalog_encoder} makes {titles_by.info.dim}-wide embeddings and "
                              f"{encoder} {info.dim}-wide ones: give the encoder {encoder} was distilled from")
        sample = data.titles[:64]
        a, b = enc.embed(sample), titles_by.embed(sample)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        seen = norms > 1e-12  # a text an encoder maps to zero says nothing either way
        agree = float(((a * b).sum(1)[seen] / norms[seen]).mean()) if seen.any() else 1.0
        if agree < AGREEMENT:
            raise ConfigError(f"{encoder} and --catalog-encoder {catalog_encoder} do not share a space (mean cosine "
                              f"{agree:.2f} on {len(sample)} titles, {AGREEMENT} at least): give the encoder "
                              f"{encoder} was distilled from")
    progress(f"embedding the catalog's {len(data.titles):,} titles")
    embeddings = titles_by.embed(data.titles, batch=128)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True).clip(1e-12)
    terms = TitleTerms.build(data.titles)
    report, fitted = None, None
    if ranker:
        progress(f"training the ranker on the judged queries ({len(data.queries):,} in all)")
        fitted, report = fit_search_ranker(data, terms, enc.embed(data.queries, batch=128), embeddings, depth, seed)
    kept = report is not None and report.kept
    configs = search_configs(info.dim, depth=report.depth if kept else 0)
    by_name = {c.name: c for c in configs}
    for cfg in configs[:-1] if kept else configs[:3]:  # a model that cannot take them stops it before any write
        check_fits(repository, cfg)
    index_files = {"model.py": python_model_shim("product_index").encode(), EMBEDDINGS: _npy(embeddings),
                   PRODUCTS: json.dumps(list(data.product_ids)).encode(), TERMS_FILE: terms.to_bytes()}
    if report is not None:
        index_files[RANKER_FILE] = report.model_dump_json(indent=2).encode()
    written = [add_version(repository, by_name[name], files) for name, files in [
        ("query_encoder", {f: (Path(encoder) / f).read_bytes() for f in FILES}),
        ("query_tokenize", {"model.py": python_model_shim("query_tokenize").encode()}),
        ("product_index", index_files)]]
    if kept:
        written.append(add_version(repository, by_name["search_ranker"], {
            "model.onnx": fitted.to_onnx().SerializeToString(), RANKER_FILE: report.model_dump_json(indent=2).encode()}))
        written.append(add_version(repository, by_name["search_topk"],
                                   {"model.py": python_model_shim("search_topk", "recommend_topk").encode()}))
    ensemble = by_name["search"]
    ens_dir = Path(repository) / ensemble.name
    (ens_dir / "1").mkdir(parents=True, exist_ok=True)
    (ens_dir / "config.pbtxt").write_text(to_pbtxt(ensemble))
    return SearchBuild([*written, ens_dir], report)


def _npy(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array.astype(np.float32))
    return buf.getvalue()
