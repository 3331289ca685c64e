"""The rollout state machine: ``reconcile(spec, status, observations, now) -> (actions, new status)``.

Every decision lives here; kopf handlers only gather observations and carry out the actions.
The status is the source of truth: it holds the step, the weight, when the step started, the
counters the last analysis started from and the failures so far, so a restarted operator picks
up exactly where the last one stopped.

Phases: Pending (candidate loading) -> Progressing (steps) <-> Paused -> Promoted, or RolledBack
(analysis failed), Aborted (spec.abort), Rejected (quality gate or invalid spec).

A decision is recorded before it is carried out: :func:`intended` gives the new status with its actions in
``pending``, which the operator writes first; the status written after the actions clears it. An operator that
stops in between (or an action that fails) finds ``pending`` set, and :func:`reconcile` carries out exactly
those actions again, with the status they came with: the step's clock is not restarted, and each Event keeps
the name it was first posted under (``Emit.key``), so the API server refuses it a second time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from recserve.converters.report import GateReport
from recserve.operator.spec import ModelRolloutSpec

TERMINAL = ("Promoted", "RolledBack", "Aborted", "Rejected")


# -- observations -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class VersionCounters:
    """Cumulative Triton counters of one version (since it was loaded)."""

    success: float = 0.0
    failure: float = 0.0
    p99_ms: float | None = None


@dataclass(frozen=True)
class Observations:
    triton_reachable: bool = True
    loaded_versions: frozenset[str] = frozenset()
    """The versions every Triton serves, as the routing policy names them: ``"1"`` of the rollout's model, ``"m:1"``
    of the candidate's own model (``spec.candidate_key``)."""
    candidate: VersionCounters | None = None
    shadow_agreement: float | None = None
    """Mean overlap@k of the candidate's shadow answers with the served ones (router metrics), if known."""
    unavailable: dict[str, str] = field(default_factory=dict)
    """Versions Triton tried and failed to load: version (named as in ``loaded_versions``) -> Triton's reason."""
    candidate_source: str | None = None
    """The sha256 of the file the candidate version was built from (its ``recserve.json`` in the model repository);
    ``""``: it has none; None: not looked at (no ``triton.modelRepository``) or unreadable (``source_error``)."""
    source_error: str | None = None
    """Why the candidate's manifest could not be read."""
    pods: dict[str, frozenset[str]] = field(default_factory=dict)
    """Each Triton (pod name, or address) -> the versions of the rollout's models it serves (named as
    ``loaded_versions``). One entry per server that answered; several behind a Service (``triton.service``)."""
    superseded: bool = False
    """A newer ModelRollout drives one of this rollout's models: a finished rollout then leaves the versions alone."""

    def served_anywhere(self, version: str) -> bool:
        """Whether some Triton serves the version (a restarted pod may lack it until it is loaded there again)."""
        return version in self.loaded_versions or any(version in v for v in self.pods.values())


# -- actions ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadVersions:
    """Serve exactly these versions of the model (Triton model control, config override); none: unload it."""

    model: str
    versions: tuple[str, ...]
    final: bool = False
    """The unload after a finished rollout: when Triton has no such model loaded (it was removed meanwhile),
    there is nothing to unload and the rollout rests."""
    pod: str = ""
    """The one Triton (``Observations.pods``) to send it to, that serves other versions than it should (it
    restarted, say); "": every Triton."""


@dataclass(frozen=True)
class SetWeights:
    """Write the routing policy: version -> weight, and the shadow share."""

    model: str
    weights: tuple[tuple[str, int], ...]
    shadow_version: str | None = None
    shadow_percent: float = 0.0


@dataclass(frozen=True)
class Emit:
    """A Kubernetes Event on the ModelRollout."""

    type: str
    reason: str
    message: str
    key: str = field(default="", compare=False)
    """Names the Event (``<rollout>.<key>``): the same decision carried out again posts no second Event."""


Action = LoadVersions | SetWeights | Emit
_KINDS: dict[str, type] = {"LoadVersions": LoadVersions, "SetWeights": SetWeights, "Emit": Emit}


def encode(actions: list[Action]) -> list[dict[str, Any]]:
    """Actions as JSON-able dicts with camelCase keys, for ``status.pending``."""
    return [{"kind": type(a).__name__, **{_camel(k): v for k, v in asdict(a).items()}} for a in actions]


def decode(items: list[dict[str, Any]]) -> list[Action]:
    """The inverse of :func:`encode`; entries it does not know (a newer operator wrote them) are left out."""
    out: list[Action] = []
    for item in items or []:
        kind = _KINDS.get(str(item.get("kind")))
        if kind is None:
            continue
        fields = {_snake(k): v for k, v in item.items() if _snake(k) in kind.__dataclass_fields__}
        if "versions" in fields:
            fields["versions"] = tuple(fields["versions"])
        if "weights" in fields:
            fields["weights"] = tuple((str(v), int(w)) for v, w in fields["weights"])
        out.append(kind(**fields))
    return out


# -- status -----------------------------------------------------------------------------------------
@dataclass
class Analysis:
    at: float = 0.0
    requests: float = 0.0
    error_rate: float | None = None
    p99_ms: float | None = None
    shadow_agreement: float | None = None
    verdict: str = "inconclusive"
    """``passed``, ``failed`` or ``inconclusive`` (too few requests)."""
    reasons: list[str] = field(default_factory=list)


@dataclass
class Status:
    phase: str = "Pending"
    stable_version: str = ""
    candidate_version: str = ""
    step: int = 0
    weight: int = 0
    step_started_at: float | None = None
    last_analysis_at: float | None = None
    baseline_success: float = 0.0
    baseline_failure: float = 0.0
    failures: int = 0
    passed_in_step: int = 0
    last_analysis: Analysis | None = None
    message: str = ""
    conditions: list[dict[str, str]] = field(default_factory=list)
    unload_after: float | None = None
    """After a terminal decision: when to unload the version no longer routed to (routers had time to drain)."""
    keep_versions: list[str] = field(default_factory=list)
    """The versions Triton keeps at that unload."""
    loading_since: float | None = None
    """When this rollout first asked Triton to load its versions."""
    inconclusive: int = 0
    """Inconclusive analyses in a row (their requests carry over: the baseline stays where it was)."""
    unreachable: int = 0
    """Looks in a row that found Triton unreachable: the next one waits ``2 ** unreachable`` s (at most 30 s, and at
    most the analysis interval)."""
    next_look_at: float | None = None
    """While Triton is unreachable: when to look again (the operator skips the ticks before it)."""
    pending: list[dict[str, Any]] = field(default_factory=list)
    """Actions decided and recorded but not known to be carried out (:func:`encode`); see the module's docstring."""

    def to_dict(self) -> dict[str, Any]:
        """camelCase at every level, as Kubernetes statuses are. A None is written as null, which the
        API server's merge patch turns into a missing key: :meth:`from_dict` reads both as None."""
        d = {_camel(k): v for k, v in asdict(self).items()}
        if d["lastAnalysis"] is not None:
            d["lastAnalysis"] = {_camel(k): v for k, v in d["lastAnalysis"].items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Status:
        if not d:
            return cls()
        kw = {_snake(k): v for k, v in d.items() if _snake(k) in cls.__dataclass_fields__}
        if isinstance(kw.get("last_analysis"), dict):
            kw["last_analysis"] = Analysis(**{_snake(k): v for k, v in kw["last_analysis"].items()
                                              if _snake(k) in Analysis.__dataclass_fields__})
        return cls(**kw)


def _camel(s: str) -> str:
    head, *rest = s.split("_")
    return head + "".join(p.title() for p in rest)


def _snake(s: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in s)


@dataclass(frozen=True)
class Result:
    actions: list[Action]
    status: Status
    requeue_after: float | None = None
    """Seconds until the operator should look again (the timer also runs every interval)."""


def intended(before: Status, result: Result) -> Status | None:
    """The status to record before carrying out ``result.actions``: the new one with the actions pending. None
    when there is nothing to record: no actions, or a status that did not change (deciding again from it gives
    the same actions), or actions that are themselves a replay of ``pending``."""
    if not result.actions or result.status == before or before.pending:
        return None
    return replace(result.status, pending=encode(result.actions))


def _condition(status: Status, type_: str, ok: bool | None, reason: str, message: str, now: float) -> None:
    value = "Unknown" if ok is None else "True" if ok else "False"
    for c in status.conditions:
        if c["type"] == type_:
            if c["status"] != value:
                c["lastTransitionTime"] = _iso(now)
            c.update(status=value, reason=reason, message=message)
            return
    status.conditions.append({"type": type_, "status": value, "reason": reason, "message": message,
                              "lastTransitionTime": _iso(now)})


def _iso(t: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def weights(spec: ModelRolloutSpec, candidate_weight: int, shadow: bool = False) -> SetWeights:
    """The policy action; ``shadow`` mirrors traffic to the candidate (only while it is being rolled out)."""
    mirror = shadow and spec.router.shadow_percent > 0 and candidate_weight < 100
    return SetWeights(spec.model, ((spec.stable_version, 100 - candidate_weight), (spec.candidate_key, candidate_weight)),
                      spec.candidate_key if mirror else None, spec.router.shadow_percent if mirror else 0.0)


def loads(spec: ModelRolloutSpec, keep: tuple[str, ...], final: bool = False) -> list[LoadVersions]:
    """Triton serving exactly ``keep`` (versions named as the policy names them, ``spec.candidate_key``): one
    action for the rollout's model, and one for the candidate's own model when it has one."""
    if spec.candidate_model_name == spec.model:
        return [LoadVersions(spec.model, keep, final)]
    mine = tuple(v for v in keep if v != spec.candidate_key)
    theirs = (spec.candidate_version,) if spec.candidate_key in keep else ()
    return [LoadVersions(spec.model, mine, final), LoadVersions(spec.candidate_model_name, theirs, final)]


def held_versions(spec: ModelRolloutSpec, st: Status) -> tuple[str, ...] | None:
    """The versions every Triton should serve in this status: both while the canary runs (and while routers drain
    after it), the one it ended on after that; None while they are being loaded (Pending) or never were
    (Rejected)."""
    if st.phase in ("Progressing", "Paused") or (st.phase in TERMINAL and st.unload_after is not None):
        return (spec.stable_version, spec.candidate_key)
    if st.phase == "Promoted":
        return (spec.candidate_key,)
    if st.phase in ("RolledBack", "Aborted"):
        return (spec.stable_version,)
    return None


def resync(spec: ModelRolloutSpec, st: Status, obs: Observations) -> list[LoadVersions]:
    """Model control for each Triton that serves other versions than the status holds (a pod that restarted
    loads its repository's defaults): exactly those versions again, on that pod only. A finished rollout that a
    newer one has superseded holds nothing."""
    want = held_versions(spec, st)
    if want is None or (st.phase in TERMINAL and obs.superseded):
        return []
    return [replace(a, pod=pod) for pod, have in sorted(obs.pods.items()) if have != frozenset(want)
            for a in loads(spec, want)]


def gate_failure(report: dict[str, Any] | None) -> str | None:
    """Why the candidate's compression report refuses it, or None."""
    if not report:
        return None
    try:
        gate = GateReport.model_validate(report.get("gate"))
    except ValidationError:
        return "compressionReport has no gate result: attach the report.json of `recserve compress`"
    if not gate.passed:
        return "the candidate failed its compression quality gate: " + "; ".join(gate.reasons or ["(no reasons)"])
    return None


def report_binding(spec: ModelRolloutSpec, obs: Observations) -> tuple[bool | None, str]:
    """Whether the compression report is the candidate's: (True, why) when the candidate version was built from
    the model the report names, (False, why) when it was not (or cannot say: no manifest), (None, why) when it
    cannot be checked now (the manifest is unreadable) or at all (no report hash, no ``modelRepository``)."""
    wanted = (spec.compression_report or {}).get("model_sha256")
    where = f"version {spec.candidate_version} of {spec.candidate_model_name}"
    if not wanted:
        return None, "the compression report names no model_sha256 (a report from before reports named it)"
    if not spec.triton.model_repository:
        return None, "set triton.modelRepository to check the report against the candidate's files"
    if obs.candidate_source is None:
        return None, f"cannot read the manifest of {where}: {obs.source_error or 'unknown error'}"
    if obs.candidate_source == "":
        return False, (f"{where} has no recserve.json (build it with `recserve build`): nothing says it is the model "
                       "the compression report judged")
    if obs.candidate_source != wanted:
        return False, (f"the compression report judged the model with sha256 {wanted[:12]}…, but {where} was built "
                       f"from {obs.candidate_source[:12]}…: attach that version's own report")
    return True, f"{where} was built from the model the report judged ({wanted[:12]}…)"


def analyse(spec: ModelRolloutSpec, status: Status, obs: Observations, now: float) -> Analysis:
    """The verdict on the candidate's requests since the baseline: the last conclusive analysis (requests of
    inconclusive ones carry over, so a candidate with little traffic is judged once it has had enough)."""
    if obs.candidate is None:
        return Analysis(now, 0.0, None, None, obs.shadow_agreement, "inconclusive",
                        ["the candidate's metrics could not be read"])
    c = obs.candidate
    base_ok, base_bad = status.baseline_success, status.baseline_failure
    if c.success < base_ok or c.failure < base_bad:  # counters restarted (Triton or the version reloaded)
        base_ok = base_bad = 0.0
    ok, bad = c.success - base_ok, c.failure - base_bad
    total = ok + bad
    t = spec.analysis.thresholds
    if total < max(1, spec.analysis.min_requests):
        return Analysis(now, total, None, c.p99_ms, obs.shadow_agreement, "inconclusive",
                        [f"{total:.0f} candidate requests < minRequests {spec.analysis.min_requests} (they carry over "
                         "to the next analysis)"])
    rate = bad / total
    reasons = []
    if rate > t.max_error_rate:
        reasons.append(f"error rate {rate:.4f} > maxErrorRate {t.max_error_rate}")
    if t.max_p99_latency_ms is not None and c.p99_ms is not None and c.p99_ms > t.max_p99_latency_ms:
        reasons.append(f"p99 {c.p99_ms:.2f} ms > maxP99LatencyMs {t.max_p99_latency_ms}")
    if t.min_shadow_agreement is not None and obs.shadow_agreement is not None \
            and obs.shadow_agreement < t.min_shadow_agreement:
        reasons.append(f"shadow agreement {obs.shadow_agreement:.3f} < minShadowAgreement {t.min_shadow_agreement}")
    return Analysis(now, total, rate, c.p99_ms, obs.shadow_agreement, "failed" if reasons else "passed", reasons)


def _finish(spec: ModelRolloutSpec, st: Status, keep: str, now: float, before: list[Action],
            after: list[Action]) -> Result:
    """Route everything to ``keep`` now; unload the other version once routers have drained (or now)."""
    drain = spec.router.drain_seconds
    route = [weights(spec, 100 if keep == spec.candidate_key else 0)]
    if drain <= 0:
        return Result(before + route + loads(spec, (keep,), final=True) + after, st)
    st.unload_after, st.keep_versions = now + drain, [keep]
    return Result(before + route + after, st, requeue_after=drain)


def _rollback(spec: ModelRolloutSpec, st: Status, phase: str, reason: str, message: str, now: float) -> Result:
    st.phase, st.weight, st.message = phase, 0, message
    _condition(st, "Progressing", False, reason, message, now)
    return _finish(spec, st, spec.stable_version, now, [], [Emit("Warning", reason, message)])


def _loading(spec: ModelRolloutSpec, st: Status, obs: Observations, missing: list[str], now: float) -> Result:
    """Pending until Triton serves both versions; a version Triton failed to load, or one still missing
    after ``loadTimeoutSeconds`` (not in the model repository, say), ends the rollout on the stable one."""
    if st.loading_since is None:
        st.loading_since = now
    waited = now - st.loading_since
    failed = {v: obs.unavailable[v] for v in missing if v in obs.unavailable}
    if failed and waited > 0:  # judged after our own load request was answered, not on an older failure
        detail = "; ".join(f"version {v}: {reason}" for v, reason in failed.items())
        return _rollback(spec, st, "RolledBack", "LoadFailed", f"Triton could not load {detail}", now)
    if waited >= spec.load_timeout_seconds:
        return _rollback(spec, st, "RolledBack", "LoadTimeout",
                         f"version(s) {', '.join(missing)} of {spec.model} not loaded after {waited:.0f} s "
                         f"(loadTimeoutSeconds {spec.load_timeout_seconds:g}): are they in Triton's model repository?", now)
    st.message = f"loading versions {spec.stable_version} and {spec.candidate_key}"
    return Result([*loads(spec, (spec.stable_version, spec.candidate_key)), weights(spec, 0)], st, requeue_after=1.0)


def reconcile(spec: ModelRolloutSpec, status: Status, obs: Observations, now: float) -> Result:
    """The next actions and status. Pure: the same inputs always give the same result. Every Event it decides
    carries a key made of the decision's time and contents (see :class:`Emit`)."""
    result = _decide(spec, status, obs, now)
    actions = [replace(a, key=event_key(a, now, i)) if isinstance(a, Emit) and not a.key else a
               for i, a in enumerate(result.actions)]
    if obs.triton_reachable and not any(isinstance(a, LoadVersions) for a in actions):
        actions += resync(spec, result.status, obs)
    return replace(result, actions=actions)


def event_key(emit: Emit, now: float, index: int) -> str:
    """16 hex digits naming one decided Event: the same decision, carried out twice, names it the same."""
    import hashlib

    return hashlib.sha256(f"{now!r}|{index}|{emit.type}|{emit.reason}|{emit.message}".encode()).hexdigest()[:16]


def _decide(spec: ModelRolloutSpec, status: Status, obs: Observations, now: float) -> Result:
    st = replace(status, conditions=[dict(c) for c in status.conditions])
    interval = spec.analysis.interval_seconds
    new_target = (st.stable_version, st.candidate_version) != (spec.stable_version, spec.candidate_key)
    if new_target:  # a new rollout (or a new candidate after the last one ended): start over
        st = Status(stable_version=spec.stable_version, candidate_version=spec.candidate_key,
                    conditions=st.conditions)
    if st.pending:  # recorded, perhaps not carried out: again, exactly these, with the status they came with
        actions = decode(st.pending)
        st.pending = []
        return Result(actions, st)
    if st.phase in TERMINAL:
        if st.unload_after is not None and now >= st.unload_after:
            keep = tuple(st.keep_versions)
            st.unload_after, st.keep_versions = None, []
            return Result(loads(spec, keep, final=True), st)
        return Result([], st, requeue_after=None if st.unload_after is None else st.unload_after - now)
    if spec.abort:
        return _rollback(spec, st, "Aborted", "Aborted", "spec.abort is set: all traffic back on the stable version", now)
    refusal = gate_failure(spec.compression_report)
    if refusal:
        st.phase, st.weight, st.message = "Rejected", 0, refusal
        _condition(st, "QualityGate", False, "GateFailed", refusal, now)
        return Result([weights(spec, 0), Emit("Warning", "QualityGateFailed", refusal)], st)
    bound, why = report_binding(spec, obs) if spec.compression_report else (None, "")
    if bound is False:
        st.phase, st.weight, st.message = "Rejected", 0, why
        _condition(st, "QualityGate", False, "ReportNotForCandidate", why, now)
        return Result([weights(spec, 0), Emit("Warning", "ReportNotForCandidate", why)], st)
    if not spec.compression_report:
        _condition(st, "QualityGate", True, "NoReport", "no compression report attached", now)
    else:
        _condition(st, "QualityGate", True, "GatePassed" if bound else "GatePassedUnbound",
                   "compression report gate passed" + (f"; {why}" if why else ""), now)
    if bound is None and obs.source_error is not None and st.phase == "Pending":
        st.message = f"waiting to check the compression report: {why}"
        return Result([weights(spec, 0)], st, requeue_after=interval)
    if not obs.triton_reachable:
        delay = min(2.0 ** st.unreachable, 30.0, interval)
        st.unreachable += 1
        st.next_look_at = now + delay
        st.message = f"Triton is unreachable; looking again in {delay:g} s"
        _condition(st, "TritonReachable", False, "Unreachable", st.message, now)
        return Result([], st, requeue_after=delay)
    st.unreachable, st.next_look_at = 0, None
    _condition(st, "TritonReachable", True, "Reachable", "Triton answers", now)

    if st.phase == "Pending":
        missing = [v for v in (spec.stable_version, spec.candidate_key) if v not in obs.loaded_versions]
        if missing:
            return _loading(spec, st, obs, missing, now)
        if spec.paused:
            st.message = "paused before the first step: the candidate gets no traffic"
            return Result([weights(spec, 0)], st, requeue_after=interval)
        c = obs.candidate or VersionCounters()  # analyses count from here
        st.baseline_success, st.baseline_failure, st.last_analysis_at = c.success, c.failure, now
        return _enter_step(spec, st, obs, 0, now, [Emit("Normal", "Started", f"canary of version "
                                                         f"{spec.candidate_key} started")])

    if not obs.served_anywhere(spec.candidate_key):  # unloaded everywhere; a pod that lacks it gets it again
        return _rollback(spec, st, "RolledBack", "CandidateUnloaded",
                         f"version {spec.candidate_key} is no longer loaded in Triton", now)

    actions: list[Action] = []
    analysed = st.last_analysis_at is None or now - st.last_analysis_at >= interval
    if analysed:
        a = analyse(spec, st, obs, now)
        st.last_analysis, st.last_analysis_at = a, now
        _condition(st, "AnalysisPassing", None if a.verdict == "inconclusive" else a.verdict == "passed",
                   a.verdict.title(), "; ".join(a.reasons) or "ok", now)
        if a.verdict == "inconclusive":  # the baseline stays: these requests count in the next analysis
            st.inconclusive += 1
            limit = spec.analysis.max_inconclusive
            if limit is not None and st.inconclusive >= limit:
                return _rollback(spec, st, "RolledBack", "AnalysisInconclusive",
                                 f"{st.inconclusive} inconclusive analyses in a row (maxInconclusive {limit}): "
                                 + "; ".join(a.reasons), now)
        else:
            c = obs.candidate or VersionCounters()
            st.baseline_success, st.baseline_failure, st.inconclusive = c.success, c.failure, 0
        if a.verdict == "failed":
            st.failures += 1
            actions.append(Emit("Warning", "AnalysisFailed", "; ".join(a.reasons)))
            if st.failures >= spec.analysis.failure_limit:
                return _rollback(spec, st, "RolledBack", "AnalysisFailed",
                                 f"{st.failures} failed analyses (limit {spec.analysis.failure_limit}): "
                                 + "; ".join(a.reasons), now)
        elif a.verdict == "passed":
            st.passed_in_step += 1

    # holding the weight: with every analysis it is written again, so a policy someone overwrote (or a write
    # that was lost) is put right within an interval (writing what is already there writes nothing)
    hold = [weights(spec, st.weight, shadow=True)] if analysed else []
    if spec.paused:
        st.phase, st.message = "Paused", f"paused at step {st.step + 1} ({st.weight}%)"
        return Result(actions + hold, st, requeue_after=interval)
    st.phase = "Progressing"
    st.step = min(st.step, len(spec.steps) - 1)  # steps may have been removed from a running rollout
    step = spec.steps[st.step]
    started = st.step_started_at if st.step_started_at is not None else now
    if now - started >= step.pause_seconds and st.passed_in_step > 0:
        if st.step + 1 < len(spec.steps):
            return _enter_step(spec, st, obs, st.step + 1, now, actions)
        st.phase, st.weight = "Promoted", 100
        st.message = f"version {spec.candidate_key} serves all traffic"
        _condition(st, "Progressing", True, "Promoted", st.message, now)
        return _finish(spec, st, spec.candidate_key, now, actions, [Emit("Normal", "Promoted", st.message)])
    st.message = f"step {st.step + 1}/{len(spec.steps)} at {st.weight}%"
    if st.passed_in_step == 0:
        st.message += " (waiting for a passing analysis)"
    return Result(actions + hold, st, requeue_after=min(interval, step.pause_seconds) or interval)


def _enter_step(spec: ModelRolloutSpec, st: Status, obs: Observations, index: int, now: float,
                actions: list[Action]) -> Result:
    st.phase, st.step, st.weight = "Progressing", index, spec.steps[index].weight
    st.step_started_at, st.passed_in_step = now, 0
    st.message = f"step {index + 1}/{len(spec.steps)} at {st.weight}%"
    _condition(st, "Progressing", True, "StepStarted", st.message, now)
    return Result(actions + [weights(spec, st.weight, shadow=True), Emit("Normal", "Step", st.message)], st,
                  requeue_after=spec.analysis.interval_seconds)
