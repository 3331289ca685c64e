"""Coalescing concurrent cloud calls: while a call for a Triton model version is in flight, the rows of
the Rank requests that arrive for it queue, and go out together as one Triton request when a call
slot frees (up to the model's ``max_batch_size`` rows). At low load nothing waits and nothing changes;
under load one gRPC call carries several Rank requests, which cuts the router's per-request cost of
calling Triton (and Triton's), the largest part of a routed call after the router's own gRPC server.

Each waiter keeps its own deadline: one that expires leaves the queue (or the batch) with a timeout,
the others are unaffected. A batch that fails fails each of its requests the same way.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from recserve.serving.scorers import CloudAnswer, CloudError

Score = Callable[[str, str, np.ndarray, np.ndarray, float], Awaitable[CloudAnswer]]
"""(model, version, sparse, dense, timeout_s) -> the answer: a cloud call."""


@dataclass
class _Waiter:
    sparse: np.ndarray
    dense: np.ndarray
    deadline: float
    future: asyncio.Future


@dataclass
class _Lane:
    """The calls of one (model, version)."""

    in_flight: int = 0
    queue: deque[_Waiter] = field(default_factory=deque)


def take(rows: list[int], max_rows: int) -> int:
    """How many of the queued requests (their row counts, oldest first) go in the next call: as many as fit
    in ``max_rows``, and always at least one (a request larger than the limit goes alone, as it would have)."""
    total, n = 0, 0
    for r in rows:
        if n and total + r > max_rows:
            break
        total, n = total + r, n + 1
    return n


class Coalescer:
    """Wraps a cloud call: at most ``max_in_flight`` calls per model version, the rest coalesced."""

    def __init__(self, score: Score, max_rows: Callable[[str], int], max_in_flight: int = 1,
                 clock: Callable[[], float] | None = None, on_batch: Callable[[str, int], None] | None = None):
        self._score, self._max_rows, self.max_in_flight = score, max_rows, max_in_flight
        self._clock = clock
        self._on_batch = on_batch or (lambda model, n: None)
        self._lanes: dict[tuple[str, str], _Lane] = {}
        self._tasks: set[asyncio.Task] = set()

    async def score(self, model: str, version: str, sparse: np.ndarray, dense: np.ndarray,
                    timeout_s: float) -> CloudAnswer:
        lane = self._lanes.setdefault((model, version), _Lane())
        if lane.in_flight < self.max_in_flight and not lane.queue:
            lane.in_flight += 1
            try:
                return await self._score(model, version, sparse, dense, timeout_s)
            finally:
                lane.in_flight -= 1
                self._next(model, version, lane)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(sparse, dense, loop.time() + timeout_s, loop.create_future())
        lane.queue.append(waiter)
        timer = loop.call_later(timeout_s, _expire, waiter, model, version, timeout_s)
        try:
            return await waiter.future
        finally:
            timer.cancel()

    def _next(self, model: str, version: str, lane: _Lane) -> None:
        """Send what is queued, while call slots are free."""
        while lane.queue and lane.in_flight < self.max_in_flight:
            while lane.queue and lane.queue[0].future.done():  # expired while queued
                lane.queue.popleft()
            if not lane.queue:
                return
            n = take([len(w.sparse) for w in lane.queue], max(1, self._max_rows(model)))
            batch = [lane.queue.popleft() for _ in range(n)]
            lane.in_flight += 1
            task = asyncio.get_running_loop().create_task(self._send(model, version, lane, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, model: str, version: str, lane: _Lane, batch: list[_Waiter]) -> None:
        try:
            live = [w for w in batch if not w.future.done()]
            if not live:
                return
            self._on_batch(model, len(live))
            timeout_s = max(w.deadline for w in live) - asyncio.get_running_loop().time()
            sparse = live[0].sparse if len(live) == 1 else np.concatenate([w.sparse for w in live])
            dense = live[0].dense if len(live) == 1 else np.concatenate([w.dense for w in live])
            try:
                answer = await self._score(model, version, sparse, dense, max(timeout_s, 1e-3))
            except CloudError as e:
                for w in live:
                    if not w.future.done():
                        w.future.set_exception(CloudError(e.kind, str(e)))
                return
            scores = np.asarray(answer.scores).ravel()
            if scores.size != len(sparse):  # the caller's check reports it, per request
                parts = [scores] * len(live)
            else:
                parts = np.split(scores, np.cumsum([len(w.sparse) for w in live])[:-1])
            for w, part in zip(live, parts):
                if not w.future.done():
                    w.future.set_result(CloudAnswer(part, answer.version))
        finally:
            lane.in_flight -= 1
            self._next(model, version, lane)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()


def _expire(waiter: _Waiter, model: str, version: str, timeout_s: float) -> None:
    if not waiter.future.done():
        waiter.future.set_exception(CloudError("timeout", f"{model} v{version or '-'}: no answer in "
                                               f"{timeout_s * 1e3:.1f} ms (queued behind a call in flight)"))
