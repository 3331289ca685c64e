"""A small LRU result cache with a time-to-live, for hot (user, query, candidates) keys. An entry past its
TTL is no longer a hit, but stays (until evicted or ``stale_s`` old) as the router's last rung: a stale
answer beats none when neither the cloud nor the edge fits a request's deadline."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class TTLCache:
    def __init__(self, maxsize: int = 10_000, ttl_s: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 stale_s: float = 0.0):
        self.maxsize, self.ttl_s, self.stale_s, self.clock = maxsize, ttl_s, stale_s, clock
        self._data: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        """key -> (time stored, value), oldest use first."""
        self.hits = self.misses = 0

    @property
    def enabled(self) -> bool:
        """Whether anything is ever stored (a caller can skip building keys when not)."""
        return self.maxsize > 0 and max(self.ttl_s, self.stale_s) > 0

    def get(self, key: Hashable) -> Any | None:
        """The value if stored less than ``ttl_s`` ago."""
        item = self._data.get(key)
        if item is None or self.clock() - item[0] >= self.ttl_s:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return item[1]

    def stale(self, key: Hashable) -> tuple[float, Any] | None:
        """(age in seconds, value) of an entry stored less than ``max(ttl_s, stale_s)`` ago, fresh or not."""
        item = self._data.get(key)
        if item is None:
            return None
        age = self.clock() - item[0]
        return (age, item[1]) if age < max(self.ttl_s, self.stale_s) else None

    def put(self, key: Hashable, value: Any) -> None:
        if not self.enabled:
            return
        self._data[key] = (self.clock(), value)
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)
