"""Several Triton pods behind one Service: the operator loads every pod (read from the Service's EndpointSlices),
and gives a pod that restarts the versions it should serve again, also after the rollout has ended.

Two real tritonservers on one model repository stand for two pods; kmock serves the EndpointSlices that name
them (one slice per pod: both listen on 127.0.0.1, on different ports, and a slice has one set of ports, as the
EndpointSlice controller splits them). The test plays the router against the first pod (``operator_fixtures``).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from operator_fixtures import (
    NAMESPACE,
    ApiServer,
    Traffic,
    Triton,
    handlers,
    kube,
    only_loaded,
    operator,
    phases,
    read_policy,
    report,
    rollout,
    rollout_spec,
    trained_ranker,
    wait_for,
)

from recserve.operator.pods import SERVICE_LABEL

pytestmark = pytest.mark.slow

kube = kube  # the fixture, re-exported for pytest
SERVICE = "triton"
MODEL = "rk_pods"
RESYNC_S = 1.0
"""handlers.RESYNC_SECONDS here: how often a finished rollout looks for a restarted pod (10 s by default)."""


@pytest.fixture(scope="module")
def pods(tmp_path_factory: pytest.TempPathFactory):
    ranker = trained_ranker(tmp_path_factory)
    repo = tmp_path_factory.mktemp("pods-repo")
    fleet = [Triton(repo, ranker), Triton(repo, ranker)]
    try:
        for t in fleet:
            t.server.start()
        fleet[0].add_model(MODEL)  # builds versions 1 and 2 into the shared repository; serves 1
        fleet[1].load(MODEL, ("1",))
        yield fleet
    finally:
        for t in fleet:
            t.server.stop()


def endpoint_slice(name: str, triton: Triton) -> dict:
    """The slice the EndpointSlice controller would write for one ready Triton pod of the Service."""
    s = triton.server.settings
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"{SERVICE}-{name}", "namespace": NAMESPACE, "labels": {SERVICE_LABEL: SERVICE}},
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True},
                           "targetRef": {"kind": "Pod", "name": name, "namespace": NAMESPACE}}],
            "ports": [{"name": "grpc", "port": s.grpc_port, "protocol": "TCP"},
                      {"name": "http", "port": s.http_port, "protocol": "TCP"},
                      {"name": "metrics", "port": s.metrics_port, "protocol": "TCP"}]}


def test_every_pod_is_loaded_and_a_restarted_pod_gets_the_promoted_version_again(
        kube: ApiServer, pods: list[Triton], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers, "RESYNC_SECONDS", RESYNC_S)
    first, second = pods
    for name, t in (("triton-0", first), ("triton-1", second)):
        kube.request("POST", f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices",
                     endpoint_slice(name, t))
    # a slice of another Service in the namespace is not one of these pods
    other = endpoint_slice("elsewhere", first) | {"metadata": {"name": "other-x", "namespace": NAMESPACE,
                                                               "labels": {SERVICE_LABEL: "other"}}}
    kube.request("POST", f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices", other)
    policy = tmp_path / "policy.json"
    with Traffic(first, MODEL, "1", policy) as traffic, operator() as runner:
        spec = rollout_spec(first, MODEL, policy, traffic, triton={"service": SERVICE})
        spec["triton"] = {"service": SERVICE}
        kube.create(rollout("pods", spec))
        # the canary starts only once both pods serve both versions
        wait_for(lambda: kube.status("pods").get("phase") == "Progressing", 30,
                 lambda: f"Progressing: {kube.status('pods')}\n{runner.output[-3000:]}")
        assert second.ready_versions(MODEL) == {"1", "2"} and first.ready_versions(MODEL) == {"1", "2"}
        wait_for(lambda: kube.status("pods").get("phase") in ("Promoted", "RolledBack"), 60,
                 lambda: f"the end of the rollout: {kube.status('pods')}\n{runner.output[-3000:]}")
        done = kube.status("pods")
        assert done["phase"] == "Promoted", done
        for t in pods:
            only_loaded(t, MODEL, "2")

        # the second pod restarts: Triton comes back serving nothing of the model (explicit model control)
        second.server.stop()
        restarted = time.monotonic()
        second.server.start()
        only_loaded(second, MODEL, "2")
        again = time.monotonic() - restarted
        time.sleep(3 * RESYNC_S)  # it stays so: nothing loads the old version back, nothing reloads in a loop
        assert second.ready_versions(MODEL) == {"2"} and first.ready_versions(MODEL) == {"2"}
    report(pods=2, restart_to_promoted_version_served_s=round(again, 2), resync_s=RESYNC_S)
    assert phases(kube.history("pods")) == ["Pending", "Progressing", "Promoted"]
    assert read_policy(policy, MODEL) == {"1": 0.0, "2": 100.0}
    assert traffic.failures("1") == []
    assert "Triton triton-1 serves rk_pods version(s) 2 again" in runner.output, runner.output[-3000:]
