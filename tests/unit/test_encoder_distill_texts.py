"""What a student is distilled on and chosen on (``recserve.encoder.distill._texts``): no torch needed."""

from __future__ import annotations

import pytest

from recserve.data.search import load_search
from recserve.encoder.distill import MAX_VALIDATION, SPAN_WORDS, DistillSettings, _texts, span_positions
from recserve.errors import DataError


@pytest.fixture(scope="module")
def data():
    return load_search("synthetic:400,products=300")


def test_validation_is_held_aside_tuning_queries_and_training_mixes_queries_titles_and_spans(data) -> None:
    tuning, _ = data.split(held_out=False)
    held_out, _ = data.split(held_out=True)
    train, val = _texts(data, DistillSettings(max_texts=500))
    assert set(val) <= set(tuning) and len(val) == len(set(tuning)) // 5
    assert not set(val) & set(train), "a validation query was trained on"
    assert not (set(held_out) - set(tuning)) & set(train), "a held-out query was trained on"
    assert len(train) == 500
    queries = [t for t in train if t in set(tuning)]
    titles = [t for t in train if t in set(data.titles)]
    spans = [t for t in train if t not in set(tuning) | set(data.titles)]
    assert len(set(queries)) == len(set(tuning)) - len(val), "every other tuning query is trained on"
    assert titles and spans and abs(len(titles) - len(spans)) <= len(train) // 10
    lo, hi = SPAN_WORDS
    for span in spans:
        assert lo <= len(span.split()) <= hi
        assert any(f" {span} " in f" {t} " for t in data.titles), f"{span!r} is not a run of a title's words"


def test_the_texts_are_seeded_and_bounded(data) -> None:
    assert _texts(data, DistillSettings(max_texts=300)) == _texts(data, DistillSettings(max_texts=300))
    assert _texts(data, DistillSettings(max_texts=300, seed=1)) != _texts(data, DistillSettings(max_texts=300))
    train, val = _texts(data, DistillSettings(max_texts=50))
    assert len(train) == 50 and set(train) <= set(data.split(held_out=False)[0]), "queries come first"
    assert 0 < len(val) <= MAX_VALIDATION


def test_a_small_catalog_is_not_padded_to_max_texts_with_repeated_spans(data) -> None:
    """Every other tuning query, every title, and no more spans than the titles have places for: not 30,000 texts
    drawn from 300 titles (a distillation that took minutes over the same few spans again and again)."""
    train, val = _texts(data, DistillSettings(max_texts=30_000))
    queries = len(set(data.split(held_out=False)[0])) - len(val)
    titles = sorted(set(data.titles) - set(val))
    assert len(train) == queries + len(titles) + span_positions(titles) < 30_000


def test_span_positions_count_every_run_of_one_to_four_words() -> None:
    assert SPAN_WORDS == (1, 4)
    assert span_positions(["a b c d e"]) == 5 + 4 + 3 + 2
    assert span_positions(["a b", "c", ""]) == (2 + 1) + 1 + 0


def test_data_without_tuning_queries_to_validate_on_is_refused() -> None:
    data = load_search("synthetic:2,products=20")
    with pytest.raises(DataError, match="at least 2 distinct tuning queries"):
        _texts(data, DistillSettings())
