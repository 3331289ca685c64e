"""Search data for text encoders: the ``search:`` spec on files of any column names, the synthetic text, and the
split of queries (not pairs) into tuning and held-out halves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recserve.data import load_dataset
from recserve.data.search import load_search, split_queries
from recserve.errors import DataError

CSV = '''id,product_uid,product_title,search_term,relevance
1,100,Cordless Drill 20V,cordless drill,3
2,100,Cordless Drill 20V,drill,2.33
3,101,Patio Umbrella 9 ft,drill,1
4,102,Kitchen Faucet Chrome,faucet,2.67
5,103,Kitchen Faucet Chrome,faucet,1.67
'''


def write(tmp_path: Path, text: str, name: str = "pairs.csv", encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding=encoding)
    return path


def test_a_file_with_its_own_column_names(tmp_path: Path) -> None:
    path = write(tmp_path, CSV)
    data = load_search(f"search:{path},query=search_term")
    assert data.titles == ["Cordless Drill 20V", "Patio Umbrella 9 ft", "Kitchen Faucet Chrome", "Kitchen Faucet Chrome"]
    assert data.product_ids == ["100", "101", "102", "103"], "two products with one title stay two (ids tell them apart)"
    assert data.queries == ["cordless drill", "drill", "faucet"]
    # gain = relevance - the file's lowest (1)
    assert data.judgments[1] == {0: pytest.approx(1.33), 1: 0.0}
    assert data.judgments[2] == {2: pytest.approx(1.67), 3: pytest.approx(0.67)}


def test_without_a_product_id_column_products_are_their_titles(tmp_path: Path) -> None:
    text = "query,product_title,relevance\ndrill,Drill A,1\nsaw,Drill A,0\nsaw,Saw B,1\n"
    data = load_search(f"search:{write(tmp_path, text)}")
    assert data.product_ids == ["Drill A", "Saw B"] and data.judgments[1] == {0: 0.0, 1: 1.0}


def test_latin_1_and_parquet_read_too(tmp_path: Path) -> None:
    text = "query,product_title,relevance\ncaf\u00e9 table,Caf\u00e9 Table Oak,3\n"
    assert load_search(f"search:{write(tmp_path, text, encoding='latin-1')}").queries == ["caf\u00e9 table"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"q": ["a b", "c"], "t": ["A B", "C"], "r": [1, 0]}), tmp_path / "p.parquet")
    data = load_search(f"search:{tmp_path / 'p.parquet'},query=q,title=t,relevance=r")
    assert data.queries == ["a b", "c"] and data.judgments == [{0: 1.0}, {1: 0.0}]


@pytest.mark.parametrize(("spec_tail", "text", "needle"), [
    ("", CSV, "no column(s) query=query; its columns are"),
    (",query=search_term", CSV.replace(",3\n", ",high\n"), "line 2: relevance 'high' is not a number"),
    (",query=search_term", CSV.splitlines()[0] + "\n", "has no rows"),
    (",query=search_term,colour=x", CSV, "unknown option 'colour' for search"),
])
def test_mistakes_name_what_is_wrong(tmp_path: Path, spec_tail: str, text: str, needle: str) -> None:
    with pytest.raises(DataError, match=None) as e:
        load_search(f"search:{write(tmp_path, text)}{spec_tail}")
    assert needle in str(e.value), str(e.value)


def test_search_data_is_not_ranking_data_and_a_missing_file_is_said(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="for text encoders, not rankers"):
        load_dataset(f"search:{tmp_path / 'x.csv'}")
    with pytest.raises(DataError, match="does not exist"):
        load_search(f"search:{tmp_path / 'x.csv'}")
    with pytest.raises(DataError, match="needs a path"):
        load_search("search")


def test_queries_split_in_half_by_their_text_whatever_their_order() -> None:
    queries = [f"query {i}" for i in range(101)]
    held = split_queries(queries)
    assert held.sum() == 51
    again = split_queries(list(reversed(queries)))
    assert [q for q, h in zip(reversed(queries), again) if h] == [q for q, h in zip(queries, held) if h][::-1]
    assert not np.array_equal(split_queries(queries, seed=1), held), "the seed draws another split"


def test_synthetic_search_text_is_deterministic_and_judged() -> None:
    a, b = load_search("synthetic:200,products=300,seed=3"), load_search("synthetic:200,products=300,seed=3")
    assert a.queries == b.queries and a.titles == b.titles and a.judgments == b.judgments
    assert len(a.queries) == 200 == len(set(a.queries)) and len(a.titles) == 300
    spelled = 0
    for query, judged in zip(a.queries, a.judgments):
        best = max(judged, key=judged.get)
        assert judged[best] == 2.0
        spelled += all(w in a.titles[best].lower() for w in query.split())
    assert 0.75 * len(a.queries) <= spelled < len(a.queries), "each query is words of its product, a few misspelled"
    tuning, held = a.split(False), a.split(True)
    assert len(tuning[0]) + len(held[0]) == 200 and not set(tuning[0]) & set(held[0])
    with pytest.raises(DataError, match="positive integer query count"):
        load_search("synthetic:many")
