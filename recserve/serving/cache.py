"""A small LRU result cache with a time-to-live, for hot (user, query, candidates) keys."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class TTLCache:
    def __init__(self, maxsize: int = 10_000, ttl_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.maxsize, self.ttl_s, self.clock = maxsize, ttl_s, clock
        self._data: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: Hashable) -> Any | None:
        item = self._data.get(key)
        if item is None or self.clock() >= item[0]:
            if item is not None:
                del self._data[key]
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return item[1]

    def put(self, key: Hashable, value: Any) -> None:
        if self.maxsize <= 0 or self.ttl_s <= 0:
            return
        self._data[key] = (self.clock() + self.ttl_s, value)
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)
