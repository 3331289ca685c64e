"""Deterministic splits and negative sampling shared by the readers."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from recserve.data.schema import RetrievalData, SparseFeature
from recserve.errors import DataError


def rng_for(seed: int, purpose: str) -> np.random.Generator:
    """An independent, reproducible random stream per (seed, purpose)."""
    return np.random.default_rng([seed, zlib.crc32(purpose.encode())])


def random_split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) row indices; ``round(n * test_fraction)`` test rows, at least one of each when n >= 2."""
    perm = rng_for(seed, "split").permutation(n)
    n_test = round(n * test_fraction)
    if n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


FIT, VALIDATION, TEST = 0, 1, 2
"""What :func:`hashed_split` assigns a row to."""


def splitmix64(x: np.ndarray) -> np.ndarray:
    """uint64 hashes of uint64 values (splitmix64's finalizer): well mixed, the same on every machine."""
    with np.errstate(over="ignore"):
        x = np.asarray(x, dtype=np.uint64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _uniform(seed: int, shard: int, rows: np.ndarray) -> np.ndarray:
    """A uniform [0, 1) draw per (seed, shard, row), the same however the rows are read or batched."""
    with np.errstate(over="ignore"):
        x = splitmix64(np.asarray(rows, dtype=np.uint64) + np.uint64(shard) * np.uint64(0x100000000)
                       + np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64))
    return (x >> np.uint64(11)).astype(np.float64) / float(2**53)


def hashed_split(shard: int, rows: np.ndarray, seed: int, test_fraction: float,
                 validation_fraction: float) -> np.ndarray:
    """int8 per row: FIT, VALIDATION or TEST, from a hash of (seed, shard, row index in the shard).

    A row's split depends on nothing but its own position, so a reader that streams shards block by block
    and one that loads them whole agree row for row, and adding a shard moves no earlier row. About
    ``test_fraction`` of the rows are TEST and ``validation_fraction`` of the rest VALIDATION.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise DataError(f"validation_fraction={validation_fraction} must be in [0, 1), e.g. 0.1")
    u = _uniform(seed, shard, rows)
    out = np.full(len(u), FIT, dtype=np.int8)
    out[u < test_fraction + (1.0 - test_fraction) * validation_fraction] = VALIDATION
    out[u < test_fraction] = TEST
    return out


def carve_validation(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of ``int(n * fraction)`` of ``n`` training rows held back for validation.

    The same rows ``recserve train`` held back before validation became part of the dataset
    (the first rows of ``default_rng(seed).permutation(n)``), so models trained then keep an honest
    validation split.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"validation_fraction={fraction} must be in [0, 1), e.g. 0.1")
    return np.sort(np.random.default_rng(seed).permutation(n)[: int(n * fraction)])


def leave_last_out(users: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) interaction indices: each user's latest interaction (ties: later in the input) is test.

    Users with fewer than 2 interactions keep everything in train. ``train`` is in input order,
    ``test`` is ordered by user.
    """
    n = len(users)
    order = np.lexsort((np.arange(n), times, users))
    u = np.asarray(users)[order]
    last = np.ones(n, dtype=bool)
    last[:-1] = u[1:] != u[:-1]
    first = np.ones(n, dtype=bool)
    first[1:] = u[1:] != u[:-1]
    is_test = last & ~first
    return np.sort(order[~is_test]), order[is_test]


def sample_negatives(
    users: np.ndarray,
    n_items: int,
    seen_users: np.ndarray,
    seen_items: np.ndarray,
    k: int,
    rng: np.random.Generator,
    option: str = "eval_negatives",
) -> np.ndarray:
    """int64 [len(users), k]: per entry, ``k`` distinct item rows (uniform) that user never interacted with.

    ``(seen_users, seen_items)`` are all known interactions. ``option`` names the setting to lower in the
    error raised when a user has fewer than ``k`` items left.
    """
    users = np.asarray(users, dtype=np.int64)
    out = np.empty((len(users), k), dtype=np.int64)
    if k == 0 or len(users) == 0:
        return out
    seen = np.unique(np.asarray(seen_users, np.int64) * n_items + np.asarray(seen_items, np.int64))

    # Vectorized rejection sampling: draw more candidates than needed, keep the first k valid ones.
    cand = rng.integers(0, n_items, size=(len(users), 2 * k + 16))
    keys = users[:, None] * n_items + cand
    interacted = np.zeros(keys.shape, dtype=bool)
    if seen.size:
        interacted = seen[np.minimum(np.searchsorted(seen, keys), seen.size - 1)] == keys
    ok = ~interacted & ~repeats_in_rows(cand)
    enough = ok.sum(axis=1) >= k
    first_ok = np.argsort(~ok, axis=1, kind="stable")[:, :k]
    out[enough] = np.take_along_axis(cand, first_ok, axis=1)[enough]

    # Rare rows (heavy users, small catalogs): sample exactly from what is left.
    for r in np.flatnonzero(~enough):
        u = int(users[r])
        lo, hi = np.searchsorted(seen, [u * n_items, (u + 1) * n_items])
        allowed = np.setdiff1d(np.arange(n_items), seen[lo:hi] - u * n_items)
        if len(allowed) < k:
            raise DataError(
                f"{option}={k} is too many: a user interacted with {n_items - len(allowed)} of the {n_items} items, "
                f"leaving only {len(allowed)} to sample negatives from; lower {option} to at most {len(allowed)}"
            )
        out[r] = rng.choice(allowed, size=k, replace=False)
    return out


def repeats_in_rows(a: np.ndarray) -> np.ndarray:
    """True where a value already occurred earlier in the same row."""
    order = np.argsort(a, axis=1, kind="stable")
    s = np.take_along_axis(a, order, axis=1)
    rep_sorted = np.zeros(a.shape, dtype=bool)
    rep_sorted[:, 1:] = s[:, 1:] == s[:, :-1]
    rep = np.empty_like(rep_sorted)
    np.put_along_axis(rep, order, rep_sorted, axis=1)
    return rep


def build_retrieval(
    user_features: Sequence[SparseFeature],
    item_features: Sequence[SparseFeature],
    user_table: np.ndarray,
    item_table: np.ndarray,
    users: np.ndarray,
    items: np.ndarray,
    times: np.ndarray,
    eval_negatives: int,
    seed: int,
) -> tuple[RetrievalData, np.ndarray, np.ndarray]:
    """Leave-last-out RetrievalData from interactions (user row, item row, time), plus the (train, test) indices.

    Validation is carved from ``train`` the same way (each user's last training positive), and
    ``train_pairs`` holds the rest; ``train`` (returned) still holds the validation positives.
    """
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    train, test = leave_last_out(users, times)
    negatives = sample_negatives(
        users[test], len(item_table), users, items, eval_negatives, rng_for(seed, "eval_negatives")
    )
    fit, val = validation_of(users, times, train)
    val_negatives = sample_negatives(
        users[val], len(item_table), users, items, eval_negatives, rng_for(seed, "validation_negatives")
    )
    data = RetrievalData(
        list(user_features),
        list(item_features),
        np.ascontiguousarray(user_table, dtype=np.int64),
        np.ascontiguousarray(item_table, dtype=np.int64),
        np.ascontiguousarray(np.stack([users[fit], items[fit]], axis=1)),
        np.ascontiguousarray(np.stack([users[test], items[test]], axis=1)),
        np.ascontiguousarray(negatives),
        np.ascontiguousarray(np.stack([users[val], items[val]], axis=1)),
        np.ascontiguousarray(val_negatives),
    )
    return data, train, test


def validation_of(users: np.ndarray, times: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) interaction indices within ``train``: leave-last-out applied once more."""
    fit, val = leave_last_out(users[train], times[train])
    return train[fit], train[val]
