"""What the search ranker sees of a (query, title) pair (recserve.triton.search_features), against an
independent reading with Python sets and the textbook BM25."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recserve.triton.search_features import FEATURES, TitleTerms, terms, trigrams

TITLES = ["DeWalt 20-Volt Cordless Drill", "Oak Vanity 30 in. White", "Cordless Leaf Blower", "Drill Bit Set (20-Piece)",
          "White Oak Flooring", "Behr Premium Paint White", "Ryobi Drill Drill Driver"]


def by_hand(query: str, titles: list[str], rows: list[int]) -> np.ndarray:
    docs = [set(terms(t)) for t in titles]
    n, avg = len(docs), sum(len(d) for d in docs) / len(docs)
    q = terms(query)
    idf = {w: math.log(1 + (n - sum(w in d for d in docs) + 0.5) / (sum(w in d for d in docs) + 0.5)) for w in q}
    q_grams = set(trigrams(q))
    out = []
    for r in rows:
        d = docs[r]
        found = [w for w in q if w in d]
        norm = 1 - 0.75 + 0.75 * len(d) / avg
        grams = set(trigrams(terms(titles[r])))
        out.append([len(found) / len(q), sum(idf[w] for w in found) / sum(idf.values()),
                    sum(idf[w] * 2.2 / (1 + 1.2 * norm) for w in found), len(q_grams & grams) / len(q_grams),
                    float(len(found) == len(q)), math.log1p(len(d)), math.log1p(len(q))])
    return np.array(out)


def test_terms_and_trigrams() -> None:
    assert terms("3/4 in. Oak, oak OAK_board") == ["3", "4", "in", "oak", "board"]
    assert terms("Ünïcödé façade") == ["ünïcödé", "façade"]
    assert trigrams(["oak", "ak"]) == ["#oa", "oak", "ak#", "#ak"]
    assert terms("") == [] and trigrams([]) == []


@pytest.mark.parametrize("query", ["cordless drill", "white oak", "drill drill bits", "dewlat drill", "zzz"])
def test_features_match_a_reading_by_hand(query: str) -> None:
    index = TitleTerms.build(TITLES)
    rows = np.array([6, 0, 3, 2, 5])
    cos = np.array([0.9, 0.8, 0.5, 0.4, 0.1], np.float32)
    got = index.features(query, rows, cos)
    assert got.shape == (5, len(FEATURES)) and got.dtype == np.float32
    np.testing.assert_allclose(got[:, 0], cos)
    np.testing.assert_allclose(got[:, 1], cos - 0.9, atol=1e-7)
    np.testing.assert_allclose(got[:, 2:], by_hand(query, TITLES, rows.tolist()), rtol=1e-5, atol=1e-6)


def test_a_misspelt_word_still_shares_trigrams_and_an_unseen_word_weighs_most() -> None:
    index = TitleTerms.build(TITLES)
    f = index.features("dewlat drill", np.array([0, 3]), np.array([0.5, 0.5]))  # both have "drill"
    assert f[0, FEATURES.index("trigram_share")] > f[1, FEATURES.index("trigram_share")] > 0
    assert f[0, FEATURES.index("word_share")] == f[1, FEATURES.index("word_share")] == 0.5  # "drill" alone
    idf = index.idf_of(np.array(index.vocabulary[:1].tolist() + [12345], np.int64))
    assert idf[1] == pytest.approx(index.unseen_idf) and idf[1] > idf[0]


def test_empty_query_and_no_candidates() -> None:
    index = TitleTerms.build(TITLES)
    f = index.features("  ...  ", np.array([1, 2]), np.array([0.3, 0.2]))
    assert (f[:, 2:7] == 0).all() and (f[:, FEATURES.index("query_terms")] == 0).all()
    assert index.features("drill", np.array([], np.int64), np.array([], np.float32)).shape == (0, len(FEATURES))


def test_saved_and_loaded_terms_give_the_same_features(tmp_path) -> None:
    index = TitleTerms.build(TITLES)
    index.save(tmp_path)
    again = TitleTerms.load(tmp_path)
    rows, cos = np.arange(len(TITLES)), np.linspace(1, 0, len(TITLES))
    assert len(again) == len(TITLES)
    np.testing.assert_array_equal(again.features("white paint", rows, cos), index.features("white paint", rows, cos))


@pytest.mark.parametrize("k", [1, 10, 100])
def test_the_product_index_finds_the_exact_nearest_through_its_int8_scan(tmp_path, k: int) -> None:
    """The INT8 scan keeps a shortlist and the exact cosines order it: the same rows, in the same order, as an exact
    float32 scan of the whole catalog (5,000 products, so the scan is used)."""
    import json

    from recserve.triton.search import EMBEDDINGS, PRODUCTS, ProductIndex

    rng = np.random.default_rng(k)
    emb = rng.normal(size=(5000, 48)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    np.save(tmp_path / EMBEDDINGS, emb)
    (tmp_path / PRODUCTS).write_text(json.dumps([f"p{i}" for i in range(5000)]))
    index = ProductIndex(tmp_path, threads=1)
    for q in rng.normal(size=(30, 48)).astype(np.float32):
        rows, cos = index.nearest(q, k)
        exact = emb @ (q / np.linalg.norm(q))
        want = np.argsort(-exact, kind="stable")[:k]
        assert rows.tolist() == want.tolist()
        np.testing.assert_allclose(cos, exact[want], rtol=1e-6)
    assert index.nearest(emb[7], 5000)[0].shape == (5000,)  # the whole catalog: scored exactly
    assert index.search(emb[7], 1)[0].tolist() == ["p7"]
