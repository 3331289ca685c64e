"""The rollout operator as a separate OS process, exactly as a user runs it:
``recserve operator run --namespace recserve --tick-seconds 0.5``, logging in through the kubeconfig
(``KUBECONFIG``) of kmock's Kubernetes API emulator, driving the real embedded Triton and writing the routing
policy file the test's router (``Traffic``) follows. See ``operator_fixtures`` for the emulator, Triton and the
router played by the test; ``test_operator_kopf`` runs the same handlers in a thread.

Each test starts its own operator process (its stdout and stderr go to ``operator.log`` in the test's directory,
printed when the test fails) and stops it at the end: SIGTERM, then SIGKILL if it has not exited 20 s later.
The figures are printed on lines starting ``OPERATOR`` (``pytest -s`` shows them).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from operator_fixtures import (
    NAMESPACE,
    ROOT,
    ApiServer,
    Traffic,
    Triton,
    kube,
    only_loaded,
    phases,
    read_policy,
    report,
    rollout,
    rollout_spec,
    trained_ranker,
    wait_for,
)

from recserve.errors import RecserveError
from recserve.serving.policy import parse_policy
from recserve.triton.client import TritonClient

pytestmark = pytest.mark.slow

kube = kube  # the fixture, re-exported for pytest

TICK_SECONDS = 0.5
COMMAND = [str(Path(sys.executable).parent / "recserve"), "operator", "run", "--namespace", NAMESPACE,
           "--tick-seconds", str(TICK_SECONDS)]
TERMINAL = ("Promoted", "RolledBack", "Aborted", "Rejected")


# --- the operator process --------------------------------------------------------------------------------------------


class OperatorProcess:
    """``recserve operator run`` in its own process; its output in ``log``."""

    def __init__(self, proc: subprocess.Popen, log: Path, started: float, started_wall: float):
        self.proc, self.log, self.started, self.started_wall = proc, log, started, started_wall
        self.stop_seconds: float | None = None
        self.killed = False

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, chars: int = 6000) -> str:
        return self.output()[-chars:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def running(self) -> bool:
        """True while the process runs; an AssertionError with its log as soon as it has exited (a wait on it
        fails at once rather than at its timeout)."""
        if self.proc.poll() is not None:
            raise AssertionError(f"the operator exited with {self.proc.returncode}:\n{self.tail()}")
        return True

    def logged_at(self, text: str) -> float | None:
        """Seconds from ``Popen`` to the first log line containing ``text`` (by the line's own timestamp)."""
        for line in self.output().splitlines():
            if text in line:
                try:
                    stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                except ValueError:
                    return None
                return stamp.timestamp() - self.started_wall
        return None

    def stop(self) -> None:
        """SIGTERM (kopf's graceful stop), SIGKILL if it is still there 20 s later."""
        if self.proc.poll() is not None:
            return
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.killed = True
            self.proc.kill()
            self.proc.wait(10)
        self.stop_seconds = time.monotonic() - t0


@contextlib.contextmanager
def operator_process(kubeconfig: Path, log: Path) -> Iterator[OperatorProcess]:
    """The operator started as a user starts it; stopped (and its log printed if the test failed) at the end."""
    env = dict(os.environ, KUBECONFIG=str(kubeconfig), PYTHONUNBUFFERED="1")
    for var in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "RECSERVE_OPERATOR_TICK_SECONDS"):
        env.pop(var, None)
    with log.open("wb") as out:
        started, started_wall = time.monotonic(), time.time()
        proc = subprocess.Popen(COMMAND, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
        op = OperatorProcess(proc, log, started, started_wall)
        try:
            yield op
        except BaseException:
            op.stop()
            print(f"\n--- the operator's log ({log}), its last 6000 characters ---\n{op.tail()}\n--- end of log ---")
            raise
        finally:
            op.stop()


def assert_healthy(op: OperatorProcess) -> None:
    """The operator process is still running and has logged no traceback."""
    assert op.alive(), f"the operator exited with {op.proc.returncode}:\n{op.tail()}"
    assert "Traceback" not in op.output(), op.tail()


# --- Triton and the rollouts -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Triton]:
    ranker = trained_ranker(tmp_path_factory)
    t = Triton(tmp_path_factory.mktemp("operator-process-repo"), ranker)
    t.server.start()
    try:
        yield t
    finally:
        t.server.stop()


def copy_model(triton: Triton, source: str, name: str) -> str:
    """Another Triton model: ``source``'s directory (versions 1 and 2) under ``name``; version 1 served."""
    shutil.copytree(triton.repo / source, triton.repo / name)
    config = triton.repo / name / "config.pbtxt"
    text = config.read_text()
    assert f'name: "{source}"' in text, text[:300]
    config.write_text(text.replace(f'name: "{source}"', f'name: "{name}"'))
    triton.load(name, ("1",))
    return name


def spec(tri: Triton, model: str, policy: Path, traffic: Traffic | None = None, **over) -> dict:
    """``rollout_spec`` without shadow traffic: the candidate is judged on its errors alone."""
    analysis = {"thresholds": {"maxErrorRate": 0.0}, **over.pop("analysis", {})}
    router = {"shadowPercent": 0, **over.pop("router", {})}
    return rollout_spec(tri, model, policy, traffic, analysis=analysis, router=router, **over)


def wait_phase(api: ApiServer, name: str, phase: tuple[str, ...], timeout: float, op: OperatorProcess) -> dict:
    def describe() -> str:
        return (f"{name} to reach {phase}; phases {phases(api.history(name))}, status {api.status(name)}\n"
                f"operator alive: {op.alive()}; log tail:\n{op.tail(3000)}")

    return wait_for(lambda: op.running() and (s := api.status(name)).get("phase") in phase and s, timeout, describe,
                    every=0.1)


def folded(values: list[float]) -> list[float]:
    return [w for i, w in enumerate(values) if i == 0 or values[i - 1] != w]


# --- 1. start-up -----------------------------------------------------------------------------------------------------


def test_the_operator_process_takes_up_a_rollout_created_before_it_started(kube: ApiServer, triton: Triton,
                                                                          tmp_path: Path) -> None:
    """Seconds from ``Popen`` to the operator's first status write on a rollout that was waiting for it.

    Only a generous bound is asserted (20 s): with a namespaced Role, kopf used to retry its namespace scan
    (``/api/v1/namespaces``, 403) for about 55 s before it handled any rollout. (Against kmock, which cannot serve
    that path, a scanning operator exits at once with its 500, and the test fails as soon as the process is gone.)
    The figure itself is reported."""
    model = triton.add_model("startup")
    policy = tmp_path / "policy.json"
    kube.create(rollout("waiting", spec(triton, model, policy)))
    assert kube.status("waiting") == {}  # nobody has looked at it yet
    with operator_process(tmp_path / "kubeconfig", tmp_path / "operator.log") as op:
        first = wait_for(lambda: op.running() and (s := kube.status("waiting")).get("phase") and s, 60,
                         lambda: f"a status on the rollout; operator alive {op.alive()}:\n{op.tail(3000)}", every=0.02)
        seconds = time.monotonic() - op.started
        assert_healthy(op)
        # it goes on from there: both versions loaded, the first step's weight in the policy
        progressing = wait_phase(kube, "waiting", ("Progressing", *TERMINAL), 30, op)
        assert_healthy(op)
    assert first["phase"] in ("Pending", "Progressing"), first
    assert progressing["phase"] == "Progressing", progressing
    assert read_policy(policy, model) == {"1": 70.0, "2": 30.0}
    assert not op.killed, f"the operator ignored SIGTERM for 20 s:\n{op.tail()}"
    login = op.logged_at("Initial authentication has finished")
    report(test="startup", seconds_popen_to_first_status=round(seconds, 2), first_phase=first["phase"],
           seconds_popen_to_login=None if login is None else round(login, 2),
           seconds_to_exit_after_sigterm=round(op.stop_seconds or 0.0, 2), exit_code=op.proc.returncode)
    assert seconds < 20, f"{seconds:.1f} s from Popen to the operator's first status write"


# --- 2. low traffic --------------------------------------------------------------------------------------------------

LOW_RATE_HZ = 2.0
LOW_SEED = 0
"""The router's random draws (two a request: the version, then the shadow share) come from ``default_rng(LOW_SEED)``.
In this sequence, from any of the first 200 requests (100 s at 2/s) on, the second request drawn for a 5% candidate
comes at most 51 requests (26 s) later: the test's duration is bounded and does not depend on luck (over random
draws it would have a 4% chance of taking more than 50 s)."""


class FailingCandidate(Traffic):
    """The router's traffic, where every request to the candidate fails at Triton: the candidate is sent a batch
    one row over the model's ``max_batch_size`` (64), which Triton refuses (INVALID_ARG). The router counts each
    as a failed cloud call of that version (``recserve_router_cloud_failures``), as it would a candidate that
    errors; requests to the stable version are the usual ones."""

    def __init__(self, *args, candidate: str = "2", **kw):
        super().__init__(*args, **kw)
        self.candidate = candidate
        rows = len(self.triton.feed["dense"])
        repeat = 65 // rows + 1
        self.refused = {k: np.concatenate([v] * repeat)[:65] for k, v in self.triton.feed.items()}

    def _call(self, client: TritonClient, version: str) -> np.ndarray:
        feed = self.refused if version == self.candidate else self.triton.feed
        return client.infer(self.model, feed, version=version, outputs=["score"], timeout=10)["score"]


def test_a_failing_candidate_on_little_traffic_is_rolled_back(kube: ApiServer, triton: Triton,
                                                             tmp_path: Path) -> None:
    """2 requests/s in all, 5% of them to a candidate whose every request fails: ~0.1 candidate request a second.

    ``intervalSeconds: 2`` and ``minRequests: 2``: an analysis every 2 s, which finds on average 0.2 new
    candidate requests, so almost every one is inconclusive; their requests carry over (the baseline stays), and
    the analysis that has accumulated 2 candidate requests since the step started judges them: an error rate of
    1 > ``maxErrorRate`` 0, failed, and ``failureLimit: 1`` rolls the candidate back. 2 requests at 0.1/s take
    20 s on average and, with this traffic's seed (``LOW_SEED``), at most 26 s: with the operator's start and the
    candidate's load the rollout ends within ~40 s (the wait allows 90 s). Without the carry-over (a verdict from
    one interval's requests only), an interval would need 2 of them: the rollout would wait minutes."""
    model = triton.add_model("lowtraffic")
    policy = tmp_path / "policy.json"
    interval, min_requests = 2.0, 2
    with FailingCandidate(triton, model, "1", policy, rate_hz=LOW_RATE_HZ, seed=LOW_SEED) as traffic:
        with operator_process(tmp_path / "kubeconfig", tmp_path / "operator.log") as op:
            created = time.time()
            kube.create(rollout("low", spec(triton, model, policy, traffic,
                                            steps=[{"weight": 5, "pauseSeconds": 600}],
                                            analysis={"intervalSeconds": interval, "failureLimit": 1,
                                                      "minRequests": min_requests})))
            st = wait_phase(kube, "low", TERMINAL, 90, op)
            only_loaded(triton, model, "1")  # the candidate goes once routers had drainSeconds to move
            after = traffic.requests("1")  # and the stable version keeps serving after the rollback (checked below)
            wait_for(lambda: traffic.requests("1") >= after + 3, 15, "3 more requests after the candidate's unload")
            assert_healthy(op)
    assert st["phase"] == "RolledBack", st
    assert st["weight"] == 0 and st["failures"] == 1, st
    conditions = {c["type"]: c for c in st["conditions"]}
    assert conditions["Progressing"]["status"] == "False" and conditions["Progressing"]["reason"] == "AnalysisFailed"
    assert conditions["AnalysisPassing"]["status"] == "False", conditions["AnalysisPassing"]
    assert "1 failed analyses (limit 1)" in st["message"] and "maxErrorRate 0.0" in st["message"], st["message"]
    assert "AnalysisFailed" in [e["reason"] for e in kube.events("low")]
    assert read_policy(policy, model) == {"1": 100.0, "2": 0.0}
    history = kube.history("low")
    assert phases(history) == ["Pending", "Progressing", "RolledBack"]
    analyses = {a["at"]: a for v in history if (a := (v.get("status") or {}).get("lastAnalysis"))}
    verdicts = [analyses[t] for t in sorted(analyses)]
    assert [a["verdict"] for a in verdicts][-1] == "failed", verdicts[-3:]
    assert all(a["verdict"] == "inconclusive" for a in verdicts[:-1]), verdicts  # the first conclusive one decided
    assert len(verdicts) >= 2, verdicts  # at least one inconclusive interval first: its requests carried over
    deciding = verdicts[-1]
    assert deciding["requests"] >= min_requests and deciding["errorRate"] == 1.0, deciding
    # the policy: 5% to the candidate, then all of it back on the stable version
    weights = folded(traffic.candidate_weights("2"))
    assert weights == [0.0, 5.0, 0.0], weights
    started_at = next(t for t, w, _ in traffic.policy_changes if w.get("2") == 5)
    back_at = next(t for t, w, _ in traffic.policy_changes if t > started_at and w.get("2") == 0)
    # the candidate got its share, and every request to it failed; not one request to the stable version did
    candidate_requests = traffic.requests("2")
    assert candidate_requests >= min_requests and len(traffic.failures("2")) == candidate_requests
    stable_failures = traffic.failures("1")
    assert stable_failures == [], stable_failures[:3]
    assert traffic.requests("1") > 40
    with_requests = [a for a in verdicts[:-1] if a["requests"] > 0]
    report(test="low-traffic", seconds_step_start_to_weight_0=round(back_at - started_at, 1),
           seconds_create_to_weight_0=round(back_at - created, 1), analyses=len(verdicts),
           inconclusive_with_carried_requests=len(with_requests), deciding_requests=deciding["requests"],
           candidate_requests=candidate_requests, stable_requests=traffic.requests("1"),
           stable_failures=len(stable_failures))


# --- 3. ten rollouts, one policy file --------------------------------------------------------------------------------

FLEET = 10


class PolicyReader:
    """Reads the policy file over and over while the rollouts run; every read must parse."""

    def __init__(self, path: Path):
        self.path = path
        self.reads = 0
        self.bad: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="policy-reader", daemon=True)

    def _run(self) -> None:
        seen = False
        while not self._stop.is_set():
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                if seen:  # the operator renames a new file over it: it never goes away once written
                    self.bad.append("the policy file was missing")
                self._stop.wait(0.005)
                continue
            seen = True
            try:
                parse_policy(text, str(self.path))
            except RecserveError as e:
                self.bad.append(f"{e}: {text[:200]!r}")
            self.reads += 1
            self._stop.wait(0.005)

    def __enter__(self) -> PolicyReader:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def test_ten_concurrent_rollouts_share_one_policy_file_without_losing_an_update(kube: ApiServer, triton: Triton,
                                                                               tmp_path: Path) -> None:
    """Ten models, one rollout each, all written into one policy file by one operator process at once: every
    rollout is promoted, the file ends with every model at 100% on its candidate (no rollout's write lost to
    another's), and each of the reads made meanwhile parsed (the file is replaced atomically).

    Each model gets 3 requests/s (30 in all): the emulated API server runs in this test's process, and more
    traffic threads here slow its answers to the operator (at 5/s each its status writes took ~0.7 s, not ~20 ms)."""
    models = [triton.add_model("fleet_0")] + [copy_model(triton, "fleet_0", f"fleet_{i}") for i in range(1, FLEET)]
    for m in models:
        assert triton.ready_versions(m) == {"1"}, (m, triton.loaded_states(m))
    policy = tmp_path / "policy.json"
    steps = [{"weight": 25, "pauseSeconds": 1}, {"weight": 50, "pauseSeconds": 1}]
    with contextlib.ExitStack() as stack:
        traffic = [stack.enter_context(Traffic(triton, m, "1", policy, rate_hz=3.0, seed=i))
                   for i, m in enumerate(models)]
        reader = stack.enter_context(PolicyReader(policy))
        op = stack.enter_context(operator_process(tmp_path / "kubeconfig", tmp_path / "operator.log"))
        created = time.monotonic()
        for i, (m, t) in enumerate(zip(models, traffic)):
            kube.create(rollout(f"fleet-{i}", spec(triton, m, policy, t, steps=steps,
                                                   analysis={"minRequests": 1})))

        def all_finished() -> dict[int, dict] | None:
            assert reader.bad == [], f"unparsable reads of the policy file: {reader.bad[:3]}"  # at once, not at the end
            op.running()
            statuses = {i: kube.status(f"fleet-{i}") for i in range(FLEET)}
            return statuses if all(s.get("phase") in TERMINAL for s in statuses.values()) else None

        def unfinished() -> str:
            statuses = {i: kube.status(f"fleet-{i}") for i in range(FLEET)}
            return ("every rollout to finish; not finished: "
                    + "; ".join(f"fleet-{i} {s.get('phase')} {s.get('message')!r}" for i, s in statuses.items()
                                if s.get("phase") not in TERMINAL) + f"\noperator log tail:\n{op.tail(3000)}")

        finals = wait_for(all_finished, 120, unfinished, every=0.2)
        took = time.monotonic() - created
        for m in models:
            only_loaded(triton, m, "2")
        assert_healthy(op)
        reader_stop = time.monotonic()
    # every rollout promoted; the file holds, for every model, what its rollout's final phase says
    assert [finals[i]["phase"] for i in range(FLEET)] == ["Promoted"] * FLEET, \
        {i: (s["phase"], s.get("message")) for i, s in finals.items()}
    final_policy = parse_policy(policy.read_text(), str(policy))
    assert sorted(final_policy.models) == sorted(models)
    for i, m in enumerate(models):
        want = {"1": 0.0, "2": 100.0} if finals[i]["phase"] == "Promoted" else {"1": 100.0, "2": 0.0}
        assert dict(final_policy.models[m].versions) == want, (m, finals[i]["phase"], final_policy.models[m])
        assert finals[i]["weight"] == want["2"]
        assert phases(kube.history(f"fleet-{i}")) == ["Pending", "Progressing", "Promoted"], m
    # the file parsed at every read, and was read many times while the rollouts ran
    assert reader.bad == [], reader.bad[:3]
    assert reader.reads >= 100, f"only {reader.reads} reads of the policy file in {reader_stop - created:.0f} s"
    # each router saw its model go 0 -> 25 -> 50 -> 100, never back: no write of one rollout undid another's
    for m, t in zip(models, traffic):
        assert folded(t.candidate_weights("2")) == [0.0, 25.0, 50.0, 100.0], (m, t.policy_changes[-5:])
        promoted = min(ts for ts, w, _ in t.policy_changes if w.get("2") == 100)
        assert t.failures("1", until=promoted) == [], (m, t.failures("1")[:2])
        assert t.failures("2") == [], (m, t.failures("2")[:2])
    report(test="ten-rollouts", rollouts=FLEET, seconds_create_to_all_terminal=round(took, 1),
           policy_reads=reader.reads, unparsable_reads=len(reader.bad),
           stable_failures_total=sum(len(t.failures("1")) for t in traffic))
