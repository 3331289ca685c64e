"""The search ranker (issue 19): reorders the ``depth`` products nearest a typed query by what
:mod:`recserve.triton.search_features` sees of each (the encoder's cosine and how the query's words match the
title), learnt from the graded judgments of the tuning queries.

- **Rows.** Each tuning query's ``depth`` nearest products (by the encoder that serves), their features, and
  their gains (a product the query was not judged against: 0).
- **Model.** Features standardized, then a small MLP (one ReLU layer of ``hidden`` units, or linear with 0),
  trained with a listwise loss: the softmax cross-entropy between the scores and each query's gains as a
  distribution (``2^gain - 1``, normalized; ListNet). Adam, the whole tuning set per step.
- **Choices on validation.** A share of the tuning queries (by a hash of their text, as the encoder search
  does) is never trained on: the width and the number of steps are the ones with the best NDCG@10 there,
  and the ranker is kept only when it beats the encoder's own order there. The held-out half is scored once,
  for the report.
- **Graph.** A plain ONNX graph ``features`` [N, F] float32 -> ``score`` [N, 1], standardization inside;
  Triton serves it like any model (``search_ranker``), and the router's edge runs the same file.

Build time only (torch): serving runs the graph with onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict

from recserve.data.search import SearchData
from recserve.encoder.evaluate import K, per_query, top_k
from recserve.errors import DataError
from recserve.triton.search_features import FEATURES, TitleTerms

DEPTH = 100
"""Products the ranker reorders per query (the nearest by cosine)."""
WIDTHS = (0, 16)
"""Hidden units tried (0: a linear ranker)."""
STEPS = 500
"""Adam steps at most (the one with the best validation NDCG@10 is kept, checked every ``CHECK_EVERY``)."""
CHECK_EVERY = 10
VALIDATION_SHARE = 0.25


class RankerQuality(BaseModel):
    """NDCG@10 and recall@10 of the encoder's order and of the ranker's, on one set of queries."""

    model_config = ConfigDict(extra="ignore")
    queries: int
    encoder_ndcg_at_10: float
    encoder_recall_at_10: float
    ranker_ndcg_at_10: float
    ranker_recall_at_10: float


class SearchRankerReport(BaseModel):
    """What ``recserve search-index`` learnt and measured for the ranker (``search_ranker.json``)."""

    model_config = ConfigDict(extra="ignore")
    kept: bool
    """False: the ranker did not beat the encoder's order on the validation queries; the ensemble ends at the
    nearest products."""
    depth: int
    features: list[str]
    hidden: int
    steps: int
    training_queries: int
    validation: RankerQuality
    held_out: RankerQuality


@dataclass
class Rows:
    """Per query: its ``depth`` candidate products (catalog rows, nearest first), their features and gains."""

    products: np.ndarray
    features: np.ndarray
    gains: np.ndarray
    judgments: list[dict[int, float]]

    def take(self, mask: np.ndarray) -> Rows:
        return Rows(self.products[mask], self.features[mask], self.gains[mask],
                    [j for j, m in zip(self.judgments, mask) if m])


def candidate_rows(terms: TitleTerms, queries: list[str], query_emb: np.ndarray, product_emb: np.ndarray,
                   judgments: list[dict[int, float]], depth: int) -> Rows:
    """The rows of ``queries`` (embedded as ``query_emb``) against the catalog (``product_emb``, L2-normalized)."""
    depth = min(depth, len(product_emb))
    products = top_k(query_emb, product_emb, depth)
    q = query_emb / np.linalg.norm(query_emb, axis=1, keepdims=True).clip(1e-12)
    cosines = np.einsum("qd,qkd->qk", q, product_emb[products])
    features = np.stack([terms.features(text, p, c) for text, p, c in zip(queries, products, cosines)]) \
        if len(queries) else np.zeros((0, depth, len(FEATURES)), np.float32)
    gains = np.array([[j.get(int(p), 0.0) for p in row] for row, j in zip(products, judgments)], dtype=np.float32) \
        .reshape(len(queries), depth)
    return Rows(products, features.astype(np.float32), gains, judgments)


def quality(rows: Rows, scores: np.ndarray | None) -> tuple[float, float, np.ndarray]:
    """(NDCG@10, recall@10, per-query NDCG@10) of the candidates in ``scores`` order (None: the encoder's)."""
    order = np.arange(rows.products.shape[1])[None].repeat(len(rows.products), 0) if scores is None else \
        np.argsort(-scores, axis=1, kind="stable")
    ranked = np.take_along_axis(rows.products, order[:, :K], axis=1)
    ndcg, recall = per_query(ranked, rows.judgments)
    return (float(ndcg.mean()) if len(ndcg) else 0.0), (float(recall.mean()) if len(recall) else 0.0), ndcg


@dataclass
class Fitted:
    mean: np.ndarray
    std: np.ndarray
    layers: list[tuple[np.ndarray, np.ndarray]]
    """(weight [in, out], bias [out]) per layer; ReLU between them."""
    steps: int

    def scores(self, features: np.ndarray) -> np.ndarray:
        x = (np.asarray(features, np.float32) - self.mean) / self.std
        for i, (w, b) in enumerate(self.layers):
            x = x @ w + b
            if i < len(self.layers) - 1:
                x = np.maximum(x, 0)
        return x[..., 0]

    def to_onnx(self):
        """``features`` [N, F] -> ``score`` [N, 1]."""
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        inits = [numpy_helper.from_array(self.mean.astype(np.float32), "mean"),
                 numpy_helper.from_array(self.std.astype(np.float32), "std")]
        nodes = [helper.make_node("Sub", ["features", "mean"], ["centred"]),
                 helper.make_node("Div", ["centred", "std"], ["x0"])]
        x = "x0"
        for i, (w, b) in enumerate(self.layers):
            inits += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                      numpy_helper.from_array(b.astype(np.float32), f"b{i}")]
            last = i == len(self.layers) - 1
            nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
                      helper.make_node("Add", [f"m{i}", f"b{i}"], ["score" if last else f"a{i}"])]
            if not last:
                nodes.append(helper.make_node("Relu", [f"a{i}"], [f"x{i + 1}"]))
                x = f"x{i + 1}"
        width = len(self.mean)
        graph = helper.make_graph(nodes, "search_ranker",
                                  [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", width])],
                                  [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["n", 1])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="recserve")
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def train(fit: Rows, val: Rows, hidden: int, seed: int) -> tuple[Fitted, float]:
    """The MLP of ``hidden`` units trained on ``fit``, at the step with the best NDCG@10 on ``val``."""
    import torch

    torch.manual_seed(seed)
    flat = fit.features.reshape(-1, fit.features.shape[-1])
    mean, std = flat.mean(0), flat.std(0)
    std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
    target = np.exp2(fit.gains) - 1
    has = target.sum(1) > 0
    x = torch.from_numpy(((fit.features[has] - mean) / std).astype(np.float32))
    p = torch.from_numpy((target[has] / target[has].sum(1, keepdims=True)).astype(np.float32))
    width = x.shape[-1]
    net = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)) \
        if hidden else torch.nn.Sequential(torch.nn.Linear(width, 1))
    opt = torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=1e-4)

    def snapshot(step: int) -> Fitted:
        linear = [m for m in net if isinstance(m, torch.nn.Linear)]
        return Fitted(mean.astype(np.float32), std, [(m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy())
                                                     for m in linear], step)

    best, best_ndcg = snapshot(0), -1.0
    for step in range(1, STEPS + 1):
        opt.zero_grad()
        loss = -(p * torch.log_softmax(net(x)[..., 0], dim=1)).sum(1).mean()
        loss.backward()
        opt.step()
        if step % CHECK_EVERY == 0:
            candidate = snapshot(step)
            ndcg = quality(val, candidate.scores(val.features))[0]
            if ndcg > best_ndcg:
                best, best_ndcg = candidate, ndcg
    return best, best_ndcg


def fit_search_ranker(data: SearchData, terms: TitleTerms, query_emb: np.ndarray, product_emb: np.ndarray,
                      depth: int = DEPTH, seed: int = 0) -> tuple[Fitted, SearchRankerReport]:
    """The ranker for ``data``'s catalog (``query_emb``: every query of ``data``, embedded), with its report."""
    from recserve.encoder.search import validation_split

    _, val_data = validation_split(data, VALIDATION_SHARE, seed)
    rows = candidate_rows(terms, data.queries, query_emb, product_emb, data.judgments, depth)
    is_val = val_data.held_out
    fit, val, test = rows.take(~data.held_out & ~is_val), rows.take(is_val), rows.take(data.held_out)
    if len(fit.judgments) < 2 or len(val.judgments) < 2:
        raise DataError(f"too few judged tuning queries to train the search ranker ({len(data.queries)} queries in "
                        "all): give more search data, or build with --no-ranker")
    tried = [train(fit, val, hidden, seed) for hidden in WIDTHS]
    fitted, _ = max(tried, key=lambda t: t[1])

    def measured(r: Rows) -> RankerQuality:
        e_ndcg, e_recall, _ = quality(r, None)
        r_ndcg, r_recall, _ = quality(r, fitted.scores(r.features))
        return RankerQuality(queries=len(r.judgments), encoder_ndcg_at_10=e_ndcg, encoder_recall_at_10=e_recall,
                             ranker_ndcg_at_10=r_ndcg, ranker_recall_at_10=r_recall)

    validation = measured(val)
    report = SearchRankerReport(
        kept=validation.ranker_ndcg_at_10 > validation.encoder_ndcg_at_10, depth=int(rows.products.shape[1]),
        features=FEATURES, hidden=len(fitted.layers[0][1]) if len(fitted.layers) > 1 else 0, steps=fitted.steps,
        training_queries=len(fit.judgments), validation=validation, held_out=measured(test))
    return fitted, report
