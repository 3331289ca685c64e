"""The search metrics of an encoder, on hand-made rankings whose values are known."""

from __future__ import annotations

import numpy as np
import pytest

from recserve.encoder.evaluate import retrieval_quality, teacher_agreement, top_k


def test_ndcg_and_recall_on_known_rankings() -> None:
    judged = [{0: 2.0, 1: 1.0, 5: 0.0}, {3: 1.0}, {4: 0.0}]
    top = np.array([[0, 1, 2], [2, 3, 4], [4, 0, 1]])
    got = retrieval_quality(top, judged, k=3)
    second = (1 / np.log2(3)) / 1.0  # its one relevant product at rank 2
    assert got["ndcg_at_3"] == pytest.approx((1.0 + second) / 2), "a perfect list and one off by a place"
    assert got["recall_at_3"] == pytest.approx(1.0) and got["queries"] == 2, "a query with no positive gain is left out"
    worst = retrieval_quality(np.array([[5, 2, 7]]), judged[:1], k=3)
    assert worst == {"ndcg_at_3": 0.0, "recall_at_3": 0.0, "queries": 1}, "unjudged products count as gain 0"


def test_top_k_is_the_cosine_order_over_the_whole_corpus() -> None:
    rng = np.random.default_rng(0)
    q, p = rng.normal(size=(700, 8)), rng.normal(size=(300, 8)) * rng.uniform(0.1, 10, size=(300, 1))
    got = top_k(q, p, k=10)
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (p / np.linalg.norm(p, axis=1, keepdims=True)).T
    assert np.array_equal(got, np.argsort(-cos, axis=1)[:, :10]), "the length of a product vector must not matter"
    assert top_k(q[:2], p[:3], k=10).shape == (2, 3)


def test_agreement_with_the_teacher() -> None:
    top, teacher = np.array([[1, 2, 3, 4], [5, 6, 7, 8]]), np.array([[4, 3, 9, 9], [5, 6, 7, 8]])
    q = np.array([[1.0, 0.0], [0.0, 2.0]])
    got = teacher_agreement(top, teacher, q, np.array([[1.0, 1.0], [0.0, 1.0]]))
    assert got["teacher_overlap_at_10"] == pytest.approx((2 / 4 + 1.0) / 2)
    assert got["mean_cosine"] == pytest.approx((np.sqrt(0.5) + 1.0) / 2)


class FakeEncoder:
    """Embeds a text as a fixed vector per text (``table``), counting the texts it was asked for."""

    def __init__(self, table: dict[str, np.ndarray], size: int):
        self.table, self.size, self.asked = table, size, 0
        self.info = type("Info", (), {"parameters": size})()

    def embed(self, texts: list[str], batch: int = 64) -> np.ndarray:
        self.asked += len(texts)
        return np.stack([self.table[t] for t in texts]).astype(np.float32)

    def bytes(self) -> int:
        return self.size


def test_judge_against_the_teachers_titles_embeds_them_once_and_matches_only_the_queries() -> None:
    """With ``catalog="teacher"`` a student whose titles are garbled but whose queries match the teacher's
    finds exactly the teacher's lists: only its query embeddings count."""
    from recserve.data.search import SearchData
    from recserve.encoder.evaluate import judge

    rng = np.random.default_rng(0)
    titles = [f"t{i}" for i in range(30)]
    queries = [f"q{i}" for i in range(12)]
    teacher = {t: rng.normal(size=8) for t in titles + queries}
    student = dict(teacher) | {t: rng.normal(size=8) for t in titles}  # its own titles: noise
    data = SearchData([f"p{i}" for i in range(30)], titles, queries, [{i: 1.0} for i in range(12)],
                      np.ones(12, dtype=bool))
    for catalog, same in (("teacher", True), ("self", False)):
        encoders = {"teacher": FakeEncoder(teacher, 100), "student": FakeEncoder(student, 25)}
        out = judge(encoders, data, teacher="teacher", catalog=catalog)
        assert (out["student"]["teacher_overlap_at_10"] == 1.0) == same, (catalog, out["student"])
        assert out["student"]["size_ratio"] == 4.0
        asked_for_titles = encoders["student"].asked - len(queries)
        assert asked_for_titles == (0 if catalog == "teacher" else len(titles))
