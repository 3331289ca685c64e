"""The retrieval path: user tower -> nearest neighbours over item embeddings -> ranker rows.

``recserve index`` builds two models from a trained two-tower retriever and a ranker trained on
the same data: ``user_tower`` (the user half of the two-tower graph) and ``item_index`` (the item
tower's embedding of every item, plus the ranker's item-side features of each item). Which ranker
columns are item-side is read off the ranker's training rows: a column whose value is the same in
every row of an item belongs to the item; the others (user, query, user x item crosses) come with
the request as context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.utils

from recserve.data.schema import Dataset
from recserve.errors import ConfigError, DataError, InferenceError, ModelError
from recserve.onnxrt import session


def extract_user_tower(two_tower: onnx.ModelProto) -> onnx.ModelProto:
    """The sub-graph from ``user_sparse`` to ``user_embedding``."""
    names = {i.name for i in two_tower.graph.input}
    if "user_sparse" not in names:
        raise ModelError("not a two-tower model: it has no 'user_sparse' input")
    return onnx.utils.Extractor(two_tower).extract_model(["user_sparse"], ["user_embedding"])


@dataclass
class Layout:
    """Where each ranker column comes from: the item table or the request's context."""

    sparse_item: list[int]
    sparse_context: list[int]
    dense_item: list[int]
    dense_context: list[int]
    sparse_names: list[str]
    dense_names: list[str]

    @property
    def context_sparse_names(self) -> list[str]:
        return [self.sparse_names[j] for j in self.sparse_context]

    @property
    def context_dense_names(self) -> list[str]:
        return [self.dense_names[j] for j in self.dense_context]


def _item_constant(columns: np.ndarray, item: np.ndarray) -> list[bool]:
    order = np.argsort(item, kind="stable")
    it, cols = item[order], columns[order]
    same_item = it[1:] == it[:-1]
    return [bool(np.all(cols[1:, j][same_item] == cols[:-1, j][same_item])) for j in range(cols.shape[1])]


def detect_layout(data: Dataset) -> Layout:
    t = data.ranking_train
    names = [f.name for f in t.sparse_features]
    if "item_id" not in names:
        raise DataError("the ranker's data has no 'item_id' column; the retrieval path needs one to join items")
    item = t.sparse[:, names.index("item_id")]
    s_const, d_const = _item_constant(t.sparse, item), _item_constant(t.dense, item)
    return Layout([j for j, c in enumerate(s_const) if c], [j for j, c in enumerate(s_const) if not c],
                  [j for j, c in enumerate(d_const) if c], [j for j, c in enumerate(d_const) if not c],
                  names, list(t.dense_names))


def build_catalog(ranker_data: Dataset) -> dict[str, np.ndarray | dict]:
    """The item catalog without embeddings: every item of the ranker's training rows and its item-side features."""
    layout = detect_layout(ranker_data)
    t = ranker_data.ranking_train
    col = layout.sparse_names.index("item_id")
    items, rows = np.unique(t.sparse[:, col], return_index=True)
    keep = items > 0
    vocab = ranker_data.vocabularies["item_id"]
    return {
        "item_ids": np.array([vocab.token(int(i)) for i in items[keep]]),
        "item_sparse": np.ascontiguousarray(t.sparse[rows[keep]][:, layout.sparse_item]),
        "item_dense": np.ascontiguousarray(t.dense[rows[keep]][:, layout.dense_item]),
        "layout": layout.__dict__,
    }


def build_index(two_tower: onnx.ModelProto, retriever_data: Dataset, ranker_data: Dataset) -> dict[str, np.ndarray | dict]:
    """Arrays of the ``item_index`` model: item embeddings, raw ids, ranker item features, layout."""
    r = retriever_data.retrieval
    if r is None:
        raise DataError(f"{retriever_data.spec} has no items for a retrieval index")
    sess = session(two_tower)
    _, item_emb = sess.run(None, {"user_sparse": r.user_table[:1], "item_sparse": r.item_table})
    item_vocab = retriever_data.vocabularies["item_id"]
    raw_ids = [item_vocab.tokens[i - 1] if i > 0 else "" for i in r.item_table[:, 0]]
    layout = detect_layout(ranker_data)
    t = ranker_data.ranking_train
    ranker_item = ranker_data.vocabularies["item_id"].lookup(raw_ids)
    col = layout.sparse_names.index("item_id")
    first = {}
    for row, item in enumerate(t.sparse[:, col]):
        first.setdefault(int(item), row)
    keep = np.array([i > 0 and int(i) in first for i in ranker_item])
    if not keep.any():
        raise DataError("no item of the retriever appears in the ranker's training rows: train both on the same data")
    rows = np.array([first[int(i)] for i in ranker_item[keep]])
    return {
        "embeddings": np.ascontiguousarray(item_emb[keep], dtype=np.float32),
        "item_ids": np.array([raw_ids[i] for i in np.flatnonzero(keep)]),
        "item_sparse": np.ascontiguousarray(t.sparse[rows][:, layout.sparse_item]),
        "item_dense": np.ascontiguousarray(t.dense[rows][:, layout.dense_item]),
        "layout": layout.__dict__,
    }


def save_index(index: dict, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for k in ("embeddings", "item_sparse", "item_dense"):
        if k in index:
            np.save(directory / f"{k}.npy", index[k])
    (directory / "items.json").write_text(json.dumps(index["item_ids"].tolist()))
    (directory / "layout.json").write_text(json.dumps(index["layout"]))


class ItemIndex:
    """Exact nearest-neighbour search (one matrix product) and ranker-row assembly for candidates."""

    def __init__(self, directory: Path):
        d = Path(directory)
        try:
            self.embeddings = np.load(d / "embeddings.npy") if (d / "embeddings.npy").exists() else None
            sparse, dense = np.load(d / "item_sparse.npy"), np.load(d / "item_dense.npy")
            self.item_ids = np.array(json.loads((d / "items.json").read_text()), dtype=object)
            self.layout = Layout(**json.loads((d / "layout.json").read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise ModelError(f"{d} is not an item catalog (`recserve index` or `recserve catalog` output): {e}") from e
        # each item's ranker row with the context columns left zero (a request fills them), and one extra row of
        # OOV features for items the catalog does not know: a request's rows are one gather
        lay = self.layout
        self.sparse_rows = np.zeros((len(sparse) + 1, len(lay.sparse_names)), np.int64)
        self.sparse_rows[:-1, lay.sparse_item] = sparse
        self.dense_rows = np.zeros((len(dense) + 1, len(lay.dense_names)), np.float32)
        self.dense_rows[:-1, lay.dense_item] = dense
        self.oov = len(self.item_ids)
        """The row of an unknown item."""
        self.row_of = {str(item): i for i, item in enumerate(self.item_ids)}

    def rows_for(self, item_ids: list[str]) -> np.ndarray:
        """Catalog rows of raw item ids; unknown items get the OOV row."""
        row_of, oov = self.row_of, self.oov
        return np.array([row_of.get(i, oov) for i in item_ids], dtype=np.int64)

    def search(self, user_embedding: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(item rows, scores) of the ``k`` items closest to one user embedding, best first."""
        if self.embeddings is None:
            raise ModelError("this catalog has no item embeddings: build it with `recserve index` to retrieve")
        scores = self.embeddings @ np.asarray(user_embedding, dtype=np.float32).ravel()
        k = max(1, min(int(k), len(scores)))
        best = np.argpartition(-scores, k - 1)[:k]
        best = best[np.argsort(-scores[best], kind="stable")]
        return best, scores[best]

    def ranker_rows(self, rows: np.ndarray, context_sparse: np.ndarray, context_dense: np.ndarray):
        """Full ranker inputs for candidate ``rows``: item columns from the index, context broadcast."""
        lay = self.layout
        context_sparse, context_dense = np.asarray(context_sparse).ravel(), np.asarray(context_dense).ravel()
        if len(context_sparse) != len(lay.sparse_context) or len(context_dense) != len(lay.dense_context):
            raise InferenceError(f"context: expected {len(lay.sparse_context)} sparse ({', '.join(lay.context_sparse_names)}) "
                                 f"and {len(lay.dense_context)} dense ({', '.join(lay.context_dense_names)}) values")
        sparse, dense = self.sparse_rows.take(rows, axis=0), self.dense_rows.take(rows, axis=0)
        sparse[:, lay.sparse_context] = context_sparse
        dense[:, lay.dense_context] = context_dense
        return sparse, dense


def context_encoder(ranker_preprocessing: Path, layout: Layout):
    """Encoder of the ranker's context (non-item) columns, from the ranker's vocabularies and transforms."""
    from recserve.data.schema import load_preprocessing
    from recserve.triton.features import FeatureEncoder

    vocabs, transforms = load_preprocessing(ranker_preprocessing)
    names = layout.context_sparse_names
    return FeatureEncoder(names, [vocabs[n] for n in names], [transforms[j] for j in layout.dense_context])


def build_catalog_dir(ranker: Path, data_spec: str | None, out: Path) -> Path:
    """``recserve catalog``: the item catalog of a ranker, for the router's Rank calls."""
    import shutil

    from recserve.converters.pipeline import load_model
    from recserve.data import load_dataset

    rank = load_model(ranker)
    spec = data_spec or rank.data_spec
    if not spec:
        raise DataError("pass --data: the dataset the ranker was trained on")
    save_index(build_catalog(load_dataset(spec, preprocessing=rank.preprocessing)), Path(out))
    if rank.preprocessing is not None:
        shutil.copyfile(rank.preprocessing, Path(out) / "preprocessing.json")
    return Path(out)


def build_retrieval(retriever: Path, ranker: Path, data_spec: str | None, repository: Path, *,
                    user_tower: str = "user_tower", index: str = "item_index", candidates: int = 100) -> list[Path]:
    """New versions of ``user_tower`` and ``item_index`` from a trained retriever and ranker."""
    from recserve.converters.pipeline import load_model
    from recserve.converters.repository import add_version
    from recserve.converters.triton_config import BuildProfile, model_config
    from recserve.data import load_dataset
    from recserve.triton.ensembles import item_index_config, python_model_shim

    ranker_cfg = Path(repository) / "ranker" / "config.pbtxt"
    if ranker_cfg.exists():
        from recserve.converters.triton_config import from_pbtxt

        limit = from_pbtxt(ranker_cfg.read_text()).max_batch_size
        if limit and candidates > limit:
            raise ConfigError(f"--candidates {candidates} is more than the ranker's max_batch_size {limit}: "
                              "the ranker could not score them in one request; lower --candidates")
    retr, rank = load_model(retriever), load_model(ranker)
    if retr.recserve_kind != "two-tower" or rank.recserve_kind != "ranker":
        raise ModelError("recserve index takes a two-tower retriever and a ranker (in that order)")
    spec = data_spec or retr.data_spec or rank.data_spec
    if not spec:
        raise DataError("pass --data: the dataset both models were trained on")
    retr_data = load_dataset(spec, preprocessing=retr.preprocessing)
    rank_data = load_dataset(spec, preprocessing=rank.preprocessing)
    tower = extract_user_tower(retr.graph)
    files = {"model.onnx": tower.SerializeToString()}
    if retr.preprocessing is not None:
        files["preprocessing.json"] = retr.preprocessing.read_bytes()
    tower_dir = add_version(repository, model_config(user_tower, tower, "onnxruntime", BuildProfile()), files)
    arrays = build_index(retr.graph, retr_data, rank_data)
    index_dir = add_version(repository, item_index_config(index, candidates),
                            {"model.py": python_model_shim("item_index").encode()})
    save_index(arrays, index_dir)
    return [tower_dir, index_dir]
