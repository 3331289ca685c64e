"""The load generator: open loop (requests leave at their scheduled times whatever the answers do,
latency counted from the *intended* send time, so queueing at the server is never hidden: no
coordinated omission) and closed loop (a fixed number in flight, for perf_analyzer-style numbers).

It checks itself: every request's scheduling lag (actual minus intended send time) goes into its
own histogram, and a run whose p99 lag exceeds the scenario's limit is reported as invalid.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections import Counter
from dataclasses import dataclass, field

import grpc
import numpy as np
from hdrh.histogram import HdrHistogram

from recserve.loadtest.payloads import build_payloads, make_call
from recserve.loadtest.scenario import Scenario
from recserve.loadtest.schedule import schedule
from recserve.serving.client import aio_channel

MAX_US = 60_000_000
SPIN_S = 0.0015
"""Within this much of a send time the dispatcher yields instead of sleeping (epoll sleeps round up to 1 ms)."""


def histogram() -> HdrHistogram:
    return HdrHistogram(1, MAX_US, 3)


@dataclass
class WorkerResult:
    latency: bytes
    lag: bytes
    errors: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    recorded: int = 0
    seconds: float = 0.0


class _Recorder:
    """Latency of answered requests, errors by gRPC status, and (open loop) scheduling lag."""

    def __init__(self) -> None:
        self.lat, self.lag, self.errors, self.recorded = histogram(), histogram(), Counter(), 0

    async def send(self, call, payload, timeout: float) -> str:
        try:
            await call(payload, timeout)
        except grpc.aio.AioRpcError as e:
            return e.code().name
        return "OK"

    def record(self, code: str, seconds: float) -> None:
        if code == "OK":
            self.lat.record_value(min(MAX_US, max(1, int(seconds * 1e6))))
            self.recorded += 1
        else:
            self.errors[code] += 1

    def result(self, sent: int, seconds: float) -> WorkerResult:
        if self.lag.get_total_count() == 0:
            self.lag.record_value(1)
        return WorkerResult(self.lat.encode(), self.lag.encode(), dict(self.errors), sent, self.recorded, seconds)


async def _open_loop(s: Scenario, times: np.ndarray, payloads: list) -> WorkerResult:
    rec = _Recorder()
    timeout = s.timeout_ms / 1e3
    warmup = s.arrivals.warmup_s
    async with aio_channel(s.url) as channel:
        call = make_call(s, channel)
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task] = set()

        async def one(i: int, intended: float) -> None:
            sent = loop.time()
            code = await rec.send(call, payloads[i % len(payloads)], timeout)
            if intended - start >= warmup:  # latency from the intended send time: queueing is never hidden
                rec.lag.record_value(max(1, int((sent - intended) * 1e6)))
                rec.record(code, loop.time() - intended)

        start = loop.time() + 0.05
        for i, offset in enumerate(times):
            intended = start + offset
            while True:
                delta = intended - loop.time()
                if delta <= 0:
                    break
                await asyncio.sleep(delta - SPIN_S if delta > 2 * SPIN_S else 0)
            task = loop.create_task(one(i, intended))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending, timeout=timeout + 1.0)
    return rec.result(len(times), s.arrivals.duration_s)


async def _closed_loop(s: Scenario, payloads: list) -> WorkerResult:
    rec = _Recorder()
    timeout = s.timeout_ms / 1e3
    async with aio_channel(s.url) as channel:
        call = make_call(s, channel)
        loop = asyncio.get_running_loop()
        measure_from = loop.time() + s.arrivals.warmup_s
        end = measure_from + s.arrivals.duration_s
        counter = iter(range(1 << 62))

        async def worker() -> None:
            while loop.time() < end:
                t0 = loop.time()
                code = await rec.send(call, payloads[next(counter) % len(payloads)], timeout)
                if t0 >= measure_from:
                    rec.record(code, loop.time() - t0)

        await asyncio.gather(*(worker() for _ in range(s.concurrency)))
    return rec.result(rec.recorded + sum(rec.errors.values()), s.arrivals.duration_s)


def _worker(s: Scenario, times: np.ndarray, payloads: list) -> WorkerResult:
    if s.mode == "closed":
        return asyncio.run(_closed_loop(s, payloads))
    return asyncio.run(_open_loop(s, times, payloads))


def _worker_entry(args) -> WorkerResult:
    s, times, payloads = args
    return _worker(s, times, payloads)


@dataclass
class RunResult:
    scenario: Scenario
    latency: HdrHistogram
    lag: HdrHistogram
    errors: dict[str, int]
    sent: int
    recorded: int
    seconds: float
    scheduled: int | None = None
    """Requests the schedule put in the measured window (None: the rate times the duration)."""

    def report(self) -> dict:
        s = self.scenario
        ms = lambda h, q: h.get_value_at_percentile(q) / 1e3 if h.get_total_count() else None  # noqa: E731
        lag_p99 = ms(self.lag, 99) if s.mode == "open" else None
        measured = self.recorded + sum(self.errors.values())
        reasons = invalid_reasons(s, lag_p99, self.recorded, self.seconds, self.scheduled)
        valid = not reasons
        return {
            "scenario": s.name, "target": s.target, "model": s.model, "mode": s.mode,
            "rate": s.arrivals.rate if s.mode == "open" else None,
            "concurrency": s.concurrency if s.mode == "closed" else None,
            "achieved_rps": measured / self.seconds if self.seconds else 0.0,
            "requests": measured, "ok": self.recorded, "errors": self.errors,
            "latency_ms": {f"p{q}".replace(".", "_"): ms(self.latency, q) for q in (50, 90, 99, 99.9)}
            | {"max": self.latency.get_max_value() / 1e3 if self.recorded else None},
            "lag_ms": {"p50": ms(self.lag, 50), "p99": lag_p99, "max": self.lag.get_max_value() / 1e3}
            if s.mode == "open" else None,
            "valid": valid,
            "invalid_reason": "; ".join(reasons) or None,
        }


def invalid_reasons(s: Scenario, lag_p99: float | None, ok: int, seconds: float,
                    scheduled: int | None = None) -> list[str]:
    """Why a run does not measure what it claims: no successful request, the rate not reached, the schedule lost.

    The rate is judged against what the schedule asked for in the measured window (Poisson arrivals
    over a few seconds vary by several percent around the nominal rate).
    """
    reasons = []
    wanted = scheduled if scheduled is not None else s.arrivals.rate * seconds
    if ok == 0:
        reasons.append("no request succeeded (is the target up, and the model name right?)")
    elif s.mode == "open" and seconds and ok < (1 - s.rate_tolerance) * wanted:
        reasons.append(f"{ok / seconds:,.0f} successful requests/s against the {wanted / seconds:,.0f}/s scheduled "
                       f"(rate {s.arrivals.rate:,.0f}/s; more than {s.rate_tolerance:.0%} short)")
    if lag_p99 is not None and lag_p99 > s.max_lag_p99_ms:
        reasons.append(f"p99 scheduling lag {lag_p99:.2f} ms > max_lag_p99_ms {s.max_lag_p99_ms}: the generator could "
                       "not keep the schedule (add workers or lower the rate)")
    return reasons


def run(s: Scenario) -> RunResult:
    """One run of the scenario (its rate and duration), across ``workers`` processes."""
    payloads = build_payloads(s)
    times = schedule(s.arrivals, s.seed)
    if s.workers == 1:
        results = [_worker(s, times, payloads)]
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(s.workers) as pool:
            args = [(s.model_copy(update={"concurrency": max(1, s.concurrency // s.workers)}), times[w::s.workers],
                     payloads) for w in range(s.workers)]
            results = pool.map(_worker_entry, args)
    lat, lag = histogram(), histogram()
    errors: Counter = Counter()
    for r in results:
        lat.decode_and_add(r.latency)
        lag.decode_and_add(r.lag)
        errors.update(r.errors)
    return RunResult(s, lat, lag, dict(errors), sum(r.sent for r in results), sum(r.recorded for r in results),
                     s.arrivals.duration_s, int((times >= s.arrivals.warmup_s).sum()))


def sweep(s: Scenario, rates: list[float]) -> dict:
    """Runs at each rate; the highest rate whose p99 meets the SLO in a valid run."""
    reports = []
    for rate in rates:
        r = run(s.model_copy(update={"arrivals": s.arrivals.model_copy(update={"rate": rate})}))
        reports.append(r.report())
    ok = [x for x in reports if x["valid"] and not x["errors"] and x["latency_ms"]["p99"] is not None
          and x["latency_ms"]["p99"] <= s.slo_p99_ms]
    return {"slo_p99_ms": s.slo_p99_ms, "runs": reports,
            "max_rate_meeting_slo": max((x["rate"] for x in ok), default=None)}
