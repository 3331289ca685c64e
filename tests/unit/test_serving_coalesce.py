"""Coalescing concurrent cloud calls (``recserve.serving.coalesce``) with a fake cloud call whose answers the test
releases by hand."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from recserve.serving.coalesce import Coalescer, take
from recserve.serving.scorers import CloudAnswer, CloudError


@pytest.mark.parametrize("rows, max_rows, n", [
    ([50, 50, 50], 256, 3), ([50] * 6, 256, 5), ([50] * 6, 100, 2), ([300, 50], 256, 1), ([50, 300], 256, 1),
    ([], 256, 0), ([50, 50], 1, 1)])
def test_take_fills_a_call_up_to_max_rows_and_always_takes_one(rows, max_rows, n) -> None:
    assert take(rows, max_rows) == n


class FakeCall:
    """A cloud call that waits until released; scores are the rows' first column (so slices are checkable)."""

    def __init__(self):
        self.calls: list[tuple[str, str, int, float]] = []
        self.release = asyncio.Event()
        self.fail: CloudError | None = None

    async def __call__(self, model, version, sparse, dense, timeout_s) -> CloudAnswer:
        self.calls.append((model, version, len(sparse), timeout_s))
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return CloudAnswer(sparse[:, 0].astype(np.float32), version or "7")


def rows(first: int, n: int = 50) -> tuple[np.ndarray, np.ndarray]:
    sparse = np.zeros((n, 3), np.int64)
    sparse[:, 0] = np.arange(first, first + n)
    return sparse, np.zeros((n, 2), np.float32)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 5.0))


def test_a_lone_call_goes_at_once_and_calls_behind_it_go_together() -> None:
    async def go():
        call, batches = FakeCall(), []
        c = Coalescer(call, lambda model: 256, max_in_flight=1, on_batch=lambda model, n: batches.append(n))
        first = asyncio.create_task(c.score("ranker", "", *rows(0), 1.0))
        await asyncio.sleep(0)
        assert [x[2] for x in call.calls] == [50], "nothing in flight: the first call goes alone, at once"
        behind = [asyncio.create_task(c.score("ranker", "", *rows(100 * i), 1.0)) for i in (1, 2, 3)]
        await asyncio.sleep(0)
        assert len(call.calls) == 1, "queued while one is in flight"
        call.release.set()
        answers = await asyncio.gather(first, *behind)
        assert [x[2] for x in call.calls] == [50, 150], "the three queued requests went as one call of 150 rows"
        assert batches == [3]
        for i, a in enumerate(answers):  # each gets its own rows' scores, in order
            np.testing.assert_array_equal(a.scores, np.arange(100 * i, 100 * i + 50))
            assert a.version == "7"
    run(go())


def test_a_call_never_carries_more_than_max_rows() -> None:
    async def go():
        call = FakeCall()
        c = Coalescer(call, lambda model: 120, max_in_flight=1)
        tasks = [asyncio.create_task(c.score("ranker", "1", *rows(i * 50), 1.0)) for i in range(6)]
        await asyncio.sleep(0)
        call.release.set()
        await asyncio.gather(*tasks)
        assert [x[2] for x in call.calls] == [50, 100, 100, 50]
    run(go())


def test_versions_and_models_coalesce_apart() -> None:
    async def go():
        call = FakeCall()
        c = Coalescer(call, lambda model: 256, max_in_flight=1)
        tasks = [asyncio.create_task(c.score(m, v, *rows(0), 1.0)) for m, v in
                 [("ranker", "1"), ("ranker", "2"), ("other", "1"), ("ranker", "1"), ("ranker", "2")]]
        await asyncio.sleep(0)
        assert sorted((m, v) for m, v, _, _ in call.calls) == [("other", "1"), ("ranker", "1"), ("ranker", "2")]
        call.release.set()
        await asyncio.gather(*tasks)
        assert len(call.calls) == 5
    run(go())


def test_a_failed_batch_fails_each_of_its_requests_alike() -> None:
    async def go():
        call = FakeCall()
        c = Coalescer(call, lambda model: 256, max_in_flight=1)
        tasks = [asyncio.create_task(c.score("ranker", "", *rows(0), 1.0)) for _ in range(3)]
        await asyncio.sleep(0)
        call.fail = CloudError("unavailable", "gone")
        call.release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, CloudError) and r.kind == "unavailable" for r in results)
    run(go())


def test_a_queued_request_times_out_on_its_own_deadline() -> None:
    async def go():
        call = FakeCall()
        c = Coalescer(call, lambda model: 256, max_in_flight=1)
        first = asyncio.create_task(c.score("ranker", "", *rows(0), 1.0))
        await asyncio.sleep(0)
        short = asyncio.create_task(c.score("ranker", "", *rows(100), 0.01))
        long = asyncio.create_task(c.score("ranker", "", *rows(200), 1.0))
        with pytest.raises(CloudError) as info:
            await short
        assert info.value.kind == "timeout"
        call.release.set()
        await first
        answer = await long
        np.testing.assert_array_equal(answer.scores, np.arange(200, 250))
        assert [x[2] for x in call.calls] == [50, 50], "the expired request was not sent"
    run(go())


def test_an_unknown_batch_limit_sends_one_request_per_call() -> None:
    async def go():
        call = FakeCall()
        c = Coalescer(call, lambda model: 0, max_in_flight=1)
        tasks = [asyncio.create_task(c.score("ranker", "", *rows(0), 1.0)) for _ in range(3)]
        await asyncio.sleep(0)
        call.release.set()
        await asyncio.gather(*tasks)
        assert [x[2] for x in call.calls] == [50, 50, 50]
    run(go())
