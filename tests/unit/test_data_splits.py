"""Shared split / sampling / vocabulary helpers."""

from __future__ import annotations

import numpy as np
import pytest

from recserve.data import Vocabulary
from recserve.data.features import encode, fit_vocabulary
from recserve.data.splits import leave_last_out, random_split, rng_for, sample_negatives
from recserve.errors import DataError


def test_fit_vocabulary_matches_build() -> None:
    values = np.array(["b", "a", "", "c", "a", "b", "d", "a"])
    built = Vocabulary.build("f", values.tolist(), min_freq=2)
    fitted = fit_vocabulary("f", values, min_freq=2)
    assert (fitted.tokens, fitted.counts) == (built.tokens, built.counts) == (["a", "b"], [3, 2])
    extended = fit_vocabulary("f", values, min_freq=2, extend=np.array(["z", "c", "a", "y"]))
    assert extended.tokens == ["a", "b", "y", "z"]  # "c" was seen but rare: stays OOV
    assert encode(extended, np.array([["z", "c"], ["", "a"]])).tolist() == [[4, 0], [0, 1]]
    ints = fit_vocabulary("n", np.array([7, 7, 3]))
    assert ints.tokens == ["7", "3"] and encode(ints, np.array([3, 9])).tolist() == [2, 0]


def test_random_split() -> None:
    train, test = random_split(10, 0.2, seed=1)
    assert len(test) == 2 and sorted(np.concatenate([train, test])) == list(range(10))
    assert np.array_equal(test, random_split(10, 0.2, seed=1)[1])
    assert len(random_split(3, 0.01, seed=0)[1]) == 1  # at least one test row


def test_leave_last_out_ties_by_input_order() -> None:
    users = np.array([0, 1, 0, 0, 2, 1])
    times = np.array([5, 1, 9, 9, 3, 0])
    train, test = leave_last_out(users, times)
    assert test.tolist() == [3, 1]  # user 0: tie at t=9 -> later row 3; user 1: row 1; user 2 alone
    assert train.tolist() == [0, 2, 4, 5]


def test_sample_negatives_exclude_seen_and_are_distinct() -> None:
    rng = np.random.default_rng(0)
    n_items = 30
    seen_users = np.repeat(np.arange(5), [29 - 3, 10, 1, 0, 20])
    seen_items = np.concatenate([rng.permutation(n_items)[:c] for c in (26, 10, 1, 0, 20)])
    users = np.array([0, 1, 2, 3, 4, 0])
    negs = sample_negatives(users, n_items, seen_users, seen_items, 4, rng_for(0, "t"))
    assert negs.shape == (6, 4)
    for u, row in zip(users, negs, strict=True):
        assert len(set(row)) == 4
        assert not set(row) & set(seen_items[seen_users == u])
    again = sample_negatives(users, n_items, seen_users, seen_items, 4, rng_for(0, "t"))
    assert np.array_equal(negs, again)
    with pytest.raises(DataError, match="lower eval_negatives to at most 4"):
        sample_negatives(users, n_items, seen_users, seen_items, 5, rng_for(0, "t"))
