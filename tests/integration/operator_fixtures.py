"""Helpers of the operator integration tests (``tests/integration/test_operator*.py``).

The operator runs for real: kopf (``kopf.testing.KopfRunner``, the ``recserve.operator.handlers`` module, the
same ``kopf run`` as ``recserve operator run``) logs in through a kubeconfig to kmock's Kubernetes API emulator
(real HTTP, in a thread), and drives the real embedded Triton (explicit model control) serving two versions
of a tiny ranker. The test plays the router: it reads the routing policy file the operator writes, sends
each request to the version the policy picks (and mirrors shadow traffic), and exposes the router's own
Prometheus metrics (``recserve.serving.metrics.RouterMetrics``) for the operator's analyses.

What kmock 0.8 leaves out and these tests add (``Emulator``): resourceVersions (kopf JSON-patches with a
``test`` on ``/metadata/resourceVersion``; the operator's merge patches of the policy ConfigMap carry one as a
precondition: 409 when it is stale), a 422 when such a test fails (kmock answers 500, and kopf would
retry the stale patch forever), ``metadata.generation`` bumped on spec changes (the operator compares it with
``status.observedGeneration``), names for ``generateName`` (kopf's Events), a 409 for a create of a name that
exists (the operator's Events are named after their decision, and one carried out twice is refused), uids and
creation timestamps.
kmock cannot serve ``/api/v1/namespaces`` (its path parser fails on it), so kopf runs with
``--all-namespaces``. kmock stores objects without validating them against the CRD's schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import importlib
import itertools
import json
import logging
import os
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonpatch
import kmock
import numpy as np
import pytest
import yaml

from recserve.errors import RecserveError
from recserve.serving.metrics import RouterMetrics
from recserve.serving.policy import RoutingPolicy, choose_version, parse_policy, shadow_version, split_target
from recserve.triton.client import TritonClient
from recserve.triton.server import EmbeddedTriton, ServerSettings

ROOT = Path(__file__).resolve().parents[2]
SPEC = "synthetic:6000,users=300,items=500"
NAMESPACE = "recserve"
GROUP, VERSION, PLURAL = "recserve.io", "v1alpha1", "modelrollouts"
TICK = 0.5
"""RECSERVE_OPERATOR_TICK_SECONDS for the tests: set before the handlers module is first imported."""


def import_handlers():
    """``recserve.operator.handlers`` imported with a 0.5 s tick (its timer interval is fixed at import)."""
    name = "recserve.operator.handlers"
    if name not in sys.modules:
        old = os.environ.get("RECSERVE_OPERATOR_TICK_SECONDS")
        os.environ["RECSERVE_OPERATOR_TICK_SECONDS"] = str(TICK)
        try:
            importlib.import_module(name)
        finally:
            if old is None:
                os.environ.pop("RECSERVE_OPERATOR_TICK_SECONDS", None)
            else:
                os.environ["RECSERVE_OPERATOR_TICK_SECONDS"] = old
    return sys.modules[name]


handlers = import_handlers()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str | Callable[[], str], every: float = 0.05):
    """The predicate's first truthy value, or an AssertionError naming what did not happen."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what() if callable(what) else what}")
        time.sleep(every)


# --- the Kubernetes API ----------------------------------------------------------------------------------------------

_RV = itertools.count(1)


class Emulator(kmock.KubernetesEmulator):
    """kmock's in-memory Kubernetes with what kopf needs on top (see the module docstring)."""

    async def _handle(self, request):
        if request.resource is not None and request.action == kmock.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:10]
            elif self._exists(request.resource, request.namespace, meta.get("name")):  # as the API server does
                raise kmock.KubernetesError(status=409, reason="AlreadyExists", message=f"{meta['name']} exists")
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            meta["resourceVersion"] = str(next(_RV))
            meta.setdefault("generation", 1)
        elif request.resource is not None and request.action == kmock.action.UPDATE:
            wanted = (request.data.get("metadata") or {}).get("resourceVersion") if isinstance(request.data, dict) else None
            if wanted is not None and wanted != self._resource_version(request):  # a merge patch's precondition
                raise kmock.KubernetesError(status=409, reason="Conflict", message="the object has been modified")
            meta: dict[str, Any] = {"resourceVersion": str(next(_RV))}
            if request.subresource is None and self._touches_spec(request.data):
                meta["generation"] = self._generation(request) + 1  # as the API server does on spec changes
            if isinstance(request.data, dict):
                request.data.setdefault("metadata", {}).update(meta)
            elif isinstance(request.data, list):
                request.data.extend({"op": "add", "path": f"/metadata/{k}", "value": v} for k, v in meta.items())
        try:
            return await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed as e:
            raise kmock.KubernetesError(status=422, reason="Invalid", message=f"the object has changed: {e}") from e

    def _exists(self, resource, namespace: str | None, name: str | None) -> bool:
        try:
            return name is not None and not self.objects[resource, namespace, name].deleted
        except KeyError:
            return False

    @staticmethod
    def _touches_spec(data: Any) -> bool:
        if isinstance(data, dict):
            return "spec" in data
        return isinstance(data, list) and any(str(op.get("path", "")).startswith("/spec") for op in data)

    def _resource_version(self, request) -> str | None:
        try:
            obj = self.objects[request.resource, request.namespace, request.name]
            return None if obj.deleted else obj.get("metadata", {}).get("resourceVersion")
        except KeyError:
            return None

    def _generation(self, request) -> int:
        try:
            obj = self.objects[request.resource, request.namespace, request.name]
            return int(obj.get("metadata", {}).get("generation", 1)) if not obj.deleted else 1
        except (KeyError, ValueError):
            return 1


class ApiServer:
    """kmock's emulator on a local port, in its own thread and event loop; a small synchronous client."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="kmock", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.url = ""
        self.k: Emulator | None = None

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with Emulator() as k, kmock.Server(k) as server:
            r = kmock.ResourceInfo
            every = {"get", "list", "watch", "create", "update", "patch", "delete"}
            k.resources[f"{GROUP}/{VERSION}/{PLURAL}"] = r(kind="ModelRollout", singular="modelrollout", namespaced=True,
                                                         verbs=every, shortnames={"mro"}, subresources={"status"})
            k.resources["v1/events"] = r(kind="Event", singular="event", namespaced=True, verbs=every)
            k.resources["v1/configmaps"] = r(kind="ConfigMap", singular="configmap", namespaced=True, verbs=every)
            k.resources["v1/namespaces"] = r(kind="Namespace", singular="namespace", namespaced=False, verbs=every)
            k.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = r(
                kind="CustomResourceDefinition", singular="customresourcedefinition", namespaced=False, verbs=every)
            k.objects["v1/namespaces", None, NAMESPACE] = {"apiVersion": "v1", "kind": "Namespace",
                                                           "metadata": {"name": NAMESPACE, "resourceVersion": "0"}}
            self.k, self.url = k, str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> ApiServer:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("kmock did not start")
        crd = yaml.safe_load((ROOT / "helm/recserve/crds/modelrollouts.recserve.io.yaml").read_text())
        self.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    # -- HTTP, as any client would
    def request(self, method: str, path: str, body: Any = None,
                content_type: str = "application/json") -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def path(self, name: str | None = None, namespace: str = NAMESPACE) -> str:
        return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}" + (f"/{name}" if name else "")

    def create(self, body: dict) -> dict:
        code, out = self.request("POST", self.path(), body)
        assert code in (200, 201), (code, out)
        return out

    def get(self, name: str) -> dict | None:
        code, out = self.request("GET", self.path(name))
        return out if code == 200 else None

    def status(self, name: str) -> dict:
        return (self.get(name) or {}).get("status") or {}

    def patch_spec(self, name: str, spec: dict) -> dict:
        code, out = self.request("PATCH", self.path(name), {"spec": spec}, "application/merge-patch+json")
        assert code == 200, (code, out)
        return out

    def delete(self, name: str) -> None:
        code, out = self.request("DELETE", self.path(name))
        assert code == 200, (code, out)

    def configmap(self, name: str) -> dict | None:
        code, out = self.request("GET", f"/api/v1/namespaces/{NAMESPACE}/configmaps/{name}")
        return out if code == 200 else None

    # -- what the emulator remembers (read in its own loop)
    def _read(self, fn: Callable[[Emulator], Any]) -> Any:
        async def call():
            return copy.deepcopy(fn(self.k))

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(10)

    def history(self, name: str) -> list[dict]:
        """Every stored version of the rollout, oldest first (deletions left out)."""
        return self._read(lambda k: [dict(v.raw) for v in k.objects[f"{GROUP}/{VERSION}/{PLURAL}", NAMESPACE, name]
                                     .history if v is not None])

    def events(self, name: str) -> list[dict]:
        """The Events posted about the rollout, the operator's own first (kopf's ``Logging`` ones left out)."""
        def collect(k):
            out = []
            for key in list(k.objects):
                res, _, _ = key
                obj = k.objects[key]
                if res == kmock.resource("", "v1", "events") and not obj.deleted:
                    ev = obj.raw
                    if ev.get("involvedObject", {}).get("name") == name and ev.get("reason") != "Logging":
                        out.append(ev)
            return out

        return sorted(self._read(collect), key=lambda e: e.get("eventTime", ""))

    def stored(self, resource: str, name: str, namespace: str | None = NAMESPACE) -> dict | None:
        def one(k):
            try:
                obj = k.objects[resource, namespace, name]
            except KeyError:
                return None
            return None if obj.deleted else obj.raw

        return self._read(one)

    def write_kubeconfig(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "tester", "namespace": NAMESPACE}}],
        }))
        return path


def use_kubeconfig(path: Path | str, monkeypatch: pytest.MonkeyPatch) -> None:
    """KUBECONFIG names ``path`` for the operator's login (kopf's) and the kubernetes client's default location."""
    import kubernetes.config.kube_config as kube_config

    monkeypatch.setenv("KUBECONFIG", str(path))
    # the kubernetes client reads $KUBECONFIG once, when first imported (kopf imports it early)
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))


@pytest.fixture
def kube(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ApiServer]:
    """The emulated API server, with KUBECONFIG pointing at it (as the operator's login finds it)."""
    with ApiServer() as api:
        use_kubeconfig(api.write_kubeconfig(tmp_path / "kubeconfig"), monkeypatch)
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        for noisy in ("aiohttp.access", "aiohttp.server"):
            monkeypatch.setattr(logging.getLogger(noisy), "level", logging.WARNING)
        yield api


@contextlib.contextmanager
def operator() -> Iterator[Any]:
    """``kopf run`` of the operator's module in a thread, as ``recserve operator run --all-namespaces`` runs it."""
    from kopf.testing import KopfRunner

    args = ["run", "--standalone", "--all-namespaces", "-m", "recserve.operator.handlers"]
    with KopfRunner(args, timeout=60) as runner:
        yield runner
    assert runner.exit_code == 0, runner.output[-5000:]


def rollout(name: str, spec: dict) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelRollout",
            "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}


def rollout_spec(tri: Triton, model: str, policy: Path, traffic: Traffic | None = None, **over) -> dict:
    """A ModelRollout spec against ``tri``, two quick steps, the policy in a file (and the router's metrics from
    ``traffic``); ``over`` replaces keys, merging dicts one level deep."""
    s = {
        "model": model, "stableVersion": "1", "candidateVersion": "2",
        "steps": [{"weight": 30, "pauseSeconds": 1}, {"weight": 60, "pauseSeconds": 1}],
        "analysis": {"intervalSeconds": 1, "failureLimit": 2, "minRequests": 3,
                     "thresholds": {"maxErrorRate": 0.0, "minShadowAgreement": 0.9}},
        "triton": {"grpcUrl": tri.grpc_url, "metricsUrl": tri.metrics_url},
        "router": {"policyFile": str(policy), "shadowPercent": 50, "drainSeconds": 1},
    }
    if traffic is not None:
        s["router"]["metricsUrl"] = traffic.metrics_url
    for k, v in over.items():
        s[k] = {**s[k], **v} if isinstance(v, dict) and isinstance(s.get(k), dict) else v
    return s


def only_loaded(triton: Triton, model: str, version: str) -> None:
    """Wait until Triton serves ``version`` of ``model`` and no other."""
    wait_for(lambda: triton.loaded_states(model).get(version) == "READY"
             and all(s not in ("READY", "UNLOADING") for v, s in triton.loaded_states(model).items() if v != version),
             30, lambda: f"Triton to serve only version {version} of {model}: {triton.loaded_states(model)}")


def report(**numbers) -> None:
    """One line of figures for the record (``pytest -s``)."""
    print("\nOPERATOR " + " ".join(f"{k}={v}" for k, v in numbers.items()))


def phases(history: list[dict]) -> list[str]:
    """The status phases a rollout went through, consecutive repeats folded."""
    out: list[str] = []
    for v in history:
        p = (v.get("status") or {}).get("phase")
        if p and (not out or out[-1] != p):
            out.append(p)
    return out


# --- Triton ----------------------------------------------------------------------------------------------------------

_TRAINED: dict[str, Path] = {}


def trained_ranker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny ranker, trained once per session (reusing the Triton tests' one when they ran first)."""
    if "ranker" not in _TRAINED:
        shared = sys.modules.get("triton_fixtures")
        models = getattr(shared, "_TRAINED", {}).get("models") if shared else None
        if models is not None:
            _TRAINED["ranker"] = models.ranker
        else:
            from recserve.models.pipeline import train_model

            out = tmp_path_factory.mktemp("operator-ranker") / "ranker"
            train_model(SPEC, "ranker", out, epochs=1, embedding_dim=8, threads=1, seed=0)
            _TRAINED["ranker"] = out
    return _TRAINED["ranker"]


class Triton:
    """The real tritonserver (explicit model control) with a repository the tests add models to."""

    def __init__(self, repo: Path, ranker: Path):
        self.repo, self.ranker = repo, ranker
        repo.mkdir(parents=True, exist_ok=True)
        self.server = EmbeddedTriton(ServerSettings.on_free_ports(repo, model_control="explicit"))
        from recserve.data import load_dataset

        t = load_dataset(SPEC, preprocessing=ranker / "preprocessing.json").ranking_test
        self.feed = {"sparse": t.sparse[:32], "dense": t.dense[:32]}

    @property
    def grpc_url(self) -> str:
        return self.server.grpc_url

    @property
    def metrics_url(self) -> str:
        return self.server.metrics_url

    def add_model(self, name: str, serve: tuple[str, ...] = ("1",)) -> str:
        """Versions 1 and 2 of the ranker as model ``name``; Triton serves ``serve`` (the stable version)."""
        from recserve.converters.build import build
        from recserve.converters.triton_config import BuildProfile

        for version in (1, 2):
            build(self.ranker, name, "onnxruntime", self.repo, BuildProfile(max_batch_size=64), version=version)
        self.load(name, serve)
        return name

    def load(self, name: str, versions: tuple[str, ...]) -> None:
        with TritonClient(self.grpc_url, timeout=30) as c:
            if not c.model_ready(name):
                c.load(name)
            config = c.config(name)
            config["version_policy"] = {"specific": {"versions": sorted(int(v) for v in versions)}}
            c.load(name, config=json.dumps(config))

    def ready_versions(self, name: str) -> set[str]:
        with TritonClient(self.grpc_url, timeout=10) as c:
            return {str(m["version"]) for m in c.repository_index() if m.get("name") == name and m.get("state") == "READY"}

    def loaded_states(self, name: str) -> dict[str, str]:
        with TritonClient(self.grpc_url, timeout=10) as c:
            return {str(m.get("version")): m.get("state", "") for m in c.repository_index() if m.get("name") == name}

    def unload(self, name: str) -> None:
        with contextlib.suppress(RecserveError), TritonClient(self.grpc_url, timeout=30) as c:
            c.unload(name)


# --- the router's part, played by the test ---------------------------------------------------------------------------


class Traffic:
    """Requests to the version the routing policy picks, shadow copies, and the router's metrics.

    Re-reads the policy file whenever it changes (before every request), so it follows the operator at once;
    records every served request ``(time, version, ok, error)`` and every policy change ``(mtime, weights)``.
    """

    def __init__(self, triton: Triton, model: str, stable: str, policy_file: Path, rate_hz: float = 40.0,
                 k: int = 8, seed: int = 0, policy_delay_s: float = 0.0):
        self.triton, self.model, self.stable, self.policy_file = triton, model, stable, policy_file
        self.policy_delay_s = policy_delay_s
        """Route by the policy as it was this long ago: a real router sees a new policy late (its file watcher's
        interval, a ConfigMap volume's kubelet sync). 0: the newest policy, at once."""
        self._seen: list[tuple[float, RoutingPolicy]] = []
        self.period, self.k = 1.0 / rate_hz, k
        self.rng = np.random.default_rng(seed)
        self.metrics = RouterMetrics()
        self.served: list[tuple[float, str, bool, str]] = []
        self.shadowed: list[tuple[float, str, bool, float | None]] = []
        self.policy_changes: list[tuple[float, dict[str, float], str | None]] = []
        self._policy, self._stamp = RoutingPolicy(), None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"traffic-{model}", daemon=True)
        metrics = self.metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                body = metrics.exposition()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http_thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.05},
                                             daemon=True)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}/metrics"

    def __enter__(self) -> Traffic:
        self._http_thread.start()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)
        self._http.shutdown()
        self._http.server_close()

    def policy(self) -> RoutingPolicy:
        newest = self._newest_policy()
        if self.policy_delay_s <= 0:
            return newest
        cutoff = time.time() - self.policy_delay_s
        seen = [p for t, p in self._seen if t <= cutoff]
        return seen[-1] if seen else RoutingPolicy()

    def _newest_policy(self) -> RoutingPolicy:
        try:
            st = self.policy_file.stat()
        except OSError:
            return self._policy
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            try:
                self._policy = parse_policy(self.policy_file.read_text(), str(self.policy_file))
            except (OSError, RecserveError):
                return self._policy
            self._stamp = stamp
            self._seen.append((time.time(), self._policy))
            p = self._policy.models.get(self.model)
            if p is not None:
                self.policy_changes.append((st.st_mtime_ns / 1e9, dict(p.versions), p.shadow_version))
        return self._policy

    def _call(self, client: TritonClient, version: str) -> np.ndarray:
        """``version`` as the policy names it: ``"2"``, or ``"other:1"`` (a version of another Triton model)."""
        model, number = split_target(self.model, version)
        return client.infer(model, self.triton.feed, version=number, outputs=["score"], timeout=10)["score"]

    def _run(self) -> None:
        with TritonClient(self.triton.grpc_url, timeout=10) as client:
            while not self._stop.is_set():
                policy = self.policy()
                version = choose_version(policy, self.model, float(self.rng.random())) or self.stable
                t0 = time.time()
                try:
                    scores = self._call(client, version)
                except RecserveError as e:
                    self.served.append((t0, version, False, str(e)))
                    self.metrics.cloud_failures.labels(*split_target(self.model, version), "error").inc()
                    scores = None
                else:
                    self.served.append((t0, version, True, ""))
                    self.metrics.cloud_latency.labels(*split_target(self.model, version)).observe(time.time() - t0)
                target = shadow_version(policy, self.model, version, float(self.rng.random()))
                if target is not None and scores is not None:
                    self.metrics.shadow_requests.labels(*split_target(self.model, target)).inc()
                    try:
                        shadow = self._call(client, target)
                    except RecserveError:
                        self.metrics.shadow_failures.labels(*split_target(self.model, target)).inc()
                        self.shadowed.append((time.time(), target, False, None))
                    else:
                        a = set(np.argsort(-scores.ravel())[: self.k].tolist())
                        b = set(np.argsort(-shadow.ravel())[: self.k].tolist())
                        overlap = len(a & b) / self.k
                        self.metrics.shadow_overlap.labels(*split_target(self.model, target)).observe(overlap)
                        self.shadowed.append((time.time(), target, True, overlap))
                self._stop.wait(max(0.0, self.period - (time.time() - t0)))

    # -- what happened
    def requests(self, version: str) -> int:
        return sum(1 for _, v, _, _ in self.served if v == version)

    def failures(self, version: str, until: float | None = None) -> list[tuple[float, str, bool, str]]:
        return [r for r in self.served if r[1] == version and not r[2] and (until is None or r[0] < until)]

    def candidate_weights(self, candidate: str) -> list[float]:
        """The candidate's weight in each policy the operator wrote, in order."""
        return [w.get(candidate, 0.0) for _, w, _ in self.policy_changes]


def read_policy(path: Path, model: str) -> dict[str, float]:
    return dict(parse_policy(path.read_text(), str(path)).models[model].versions)
