"""The router's TTL + LRU result cache, with a hand-moved clock."""

from __future__ import annotations

import pytest

from recserve.serving.cache import TTLCache


class Clock:
    def __init__(self, t: float = 50.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_hit_before_ttl_miss_after() -> None:
    clock = Clock()
    c = TTLCache(maxsize=10, ttl_s=5.0, clock=clock)
    c.put("k", "v")
    clock.t += 4.999
    assert c.get("k") == "v"
    clock.t = 55.0  # exactly at expiry: gone
    assert c.get("k") is None
    assert (c.hits, c.misses) == (1, 1)
    assert c.stale("k") is None, "with stale_s 0 an expired entry is no longer served at all"


def test_an_expired_entry_is_served_as_stale_until_stale_s() -> None:
    clock = Clock()
    c = TTLCache(maxsize=10, ttl_s=5.0, clock=clock, stale_s=60.0)
    c.put("k", "v")
    clock.t += 30.0
    assert c.get("k") is None, "past its TTL it is not a hit"
    assert c.stale("k") == (30.0, "v")
    clock.t += 30.0
    assert c.stale("k") is None, "60 s old: too stale"
    assert c.stale("other") is None


def test_ttl_zero_with_stale_s_keeps_entries_only_for_the_last_rung() -> None:
    clock = Clock()
    c = TTLCache(maxsize=10, ttl_s=0.0, clock=clock, stale_s=10.0)
    c.put("k", "v")
    assert c.get("k") is None
    assert c.stale("k") == (0.0, "v")


def test_put_again_refreshes_the_ttl_and_value() -> None:
    clock = Clock()
    c = TTLCache(maxsize=10, ttl_s=5.0, clock=clock)
    c.put("k", 1)
    clock.t += 4
    c.put("k", 2)
    clock.t += 4  # 8 s after the first put, 4 s after the second
    assert c.get("k") == 2
    assert len(c) == 1


def test_get_does_not_extend_the_ttl() -> None:
    clock = Clock()
    c = TTLCache(maxsize=10, ttl_s=5.0, clock=clock)
    c.put("k", 1)
    for _ in range(4):
        clock.t += 1
        assert c.get("k") == 1
    clock.t += 1
    assert c.get("k") is None


def test_lru_eviction_at_maxsize() -> None:
    c = TTLCache(maxsize=3, ttl_s=100.0, clock=Clock())
    for k in "abc":
        c.put(k, k.upper())
    assert c.get("a") == "A"  # a is now the most recently used; b the least
    c.put("d", "D")
    assert len(c) == 3
    assert c.get("b") is None
    assert [c.get(k) for k in "acd"] == ["A", "C", "D"]
    c.put("e", "E")  # a was used before c and d: evicted
    assert c.get("a") is None
    assert [c.get(k) for k in "cde"] == ["C", "D", "E"]


def test_many_puts_never_exceed_maxsize() -> None:
    c = TTLCache(maxsize=7, ttl_s=100.0, clock=Clock())
    for i in range(100):
        c.put(i, i)
        assert len(c) <= 7
    assert [c.get(i) for i in range(93, 100)] == list(range(93, 100))
    assert c.get(92) is None


@pytest.mark.parametrize("maxsize, ttl", [(0, 30.0), (10, 0.0), (-1, 30.0)])
def test_size_or_ttl_zero_disables_the_cache(maxsize: int, ttl: float) -> None:
    c = TTLCache(maxsize=maxsize, ttl_s=ttl, clock=Clock())
    c.put("k", "v")
    assert c.get("k") is None
    assert len(c) == 0
    assert c.hits == 0 and c.misses == 1


def test_tuple_keys_as_the_router_builds_them() -> None:
    c = TTLCache(maxsize=10, ttl_s=5.0, clock=Clock())
    key = ("ranker", (("user_id", "17"),), "q", ("1", "2"), 3, ())
    c.put(key, "resp")
    assert c.get(("ranker", (("user_id", "17"),), "q", ("1", "2"), 3, ())) == "resp"
    assert c.get(("ranker", (("user_id", "17"),), "q", ("2", "1"), 3, ())) is None
