"""The supervisor with the real tritonserver: SIGKILL it and it is reaped, its python backend stub and shared
memory go with it, one WARNING line says so, and it is ready again on the same gRPC port."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from triton_fixtures import http_ready, kill_tritonservers, settings, tritonserver_pids

from recserve.errors import ServerError
from recserve.triton.client import TritonClient
from recserve.triton.server import EmbeddedTriton, alive, group_members, shm_regions
from recserve.triton.supervisor import Backoff, SupervisorSettings, TritonState, TritonSupervisor

pytestmark = pytest.mark.slow

ECHO_CONFIG = """name: "echo"
backend: "python"
max_batch_size: 0
input { name: "x" data_type: TYPE_FP32 dims: [ 1 ] }
output { name: "y" data_type: TYPE_FP32 dims: [ 1 ] }
instance_group { kind: KIND_CPU count: 1 }
"""
ECHO_MODEL = """import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy())])
                for r in requests]
"""
"""A python-backend model: tritonserver runs it in a stub process, which must not outlive a killed server."""

RESTART_BOUND_S = 30


def echo_repo(root: Path) -> Path:
    (root / "echo" / "1").mkdir(parents=True)
    (root / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (root / "echo" / "1" / "model.py").write_text(ECHO_MODEL)
    return root


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
        except (OSError, IndexError):
            continue
    return found


def test_a_killed_tritonserver_is_reaped_cleaned_up_and_ready_again_on_its_port(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="recserve.triton.supervisor")
    s = settings(echo_repo(tmp_path))
    supervisor = TritonSupervisor(EmbeddedTriton(s), SupervisorSettings(poll_s=0.1, backoff=Backoff(initial_s=0.2)))
    router_side = None
    try:
        with supervisor:
            server = supervisor.server
            old = server.process.pid
            stubs = children(old)
            assert stubs, "the echo model runs in a python backend stub, a child of tritonserver"
            regions = shm_regions(stubs)
            assert regions, "the stub maps its /dev/shm region"

            router_side = TritonClient(f"127.0.0.1:{s.grpc_port}", timeout=3)  # a channel kept across the restart
            np.testing.assert_array_equal(router_side.infer("echo", {"x": np.array([1.0], np.float32)})["y"], [1.0])

            os.kill(old, signal.SIGKILL)
            killed = time.monotonic()
            deadline = killed + RESTART_BOUND_S
            while supervisor.state == TritonState.UP:
                assert time.monotonic() < deadline, "the supervisor did not notice the kill"
                time.sleep(0.01)
            # noticed: the clean-up is done before the state leaves UP
            assert not alive(old) and not any(alive(pid) for pid in stubs)
            while not (supervisor.restarts == 1 and http_ready(s.http_port)):
                assert time.monotonic() < deadline, f"not ready again {RESTART_BOUND_S} s after the kill: {caplog.text}"
                time.sleep(0.1)
            restarted_s = time.monotonic() - killed

            assert not alive(old), "the killed tritonserver was not reaped (still a zombie)"
            assert not any(alive(pid) for pid in stubs), "a python backend stub of the killed server lives on"
            assert group_members(old) == []
            assert not any(r.exists() for r in regions), "the killed server's shared memory was left in /dev/shm"

            assert supervisor.state == TritonState.UP
            assert supervisor.last_exit == f"tritonserver (pid {old}) was killed by SIGKILL"
            assert server.settings.grpc_port == s.grpc_port
            assert tritonserver_pids(s.grpc_port) == [server.process.pid] != [old]
            with TritonClient(f"127.0.0.1:{s.grpc_port}") as client:  # the same gRPC port the router was given
                assert client.server_ready() and client.model_ready("echo")
                out = client.infer("echo", {"x": np.array([1.5], np.float32)})
                np.testing.assert_array_equal(out["y"], [1.5])
            while True:  # the kept channel reconnects to the restarted server (gRPC's reconnect backoff)
                try:
                    out = router_side.infer("echo", {"x": np.array([2.0], np.float32)})
                    break
                except ServerError:
                    assert time.monotonic() < deadline, "the kept channel did not reach the restarted server"
                    time.sleep(0.2)
            np.testing.assert_array_equal(out["y"], [2.0])
            assert restarted_s < RESTART_BOUND_S

        assert supervisor.state == TritonState.STOPPED
        assert tritonserver_pids(s.grpc_port) == []  # stopped with the supervisor, and not restarted
    finally:
        if router_side is not None:
            router_side.close()
        kill_tritonservers(s.grpc_port)

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "\n" not in warnings[0]
    assert warnings[0].startswith(f"tritonserver (pid {old}) was killed by SIGKILL; restarting it on gRPC "
                                  f"127.0.0.1:{s.grpc_port} in 0.2 s; its log ended: ")
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(m.startswith("tritonserver restarted (pid ") and "restart 1" in m for m in infos), infos
