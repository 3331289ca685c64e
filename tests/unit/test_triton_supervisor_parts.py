"""The tritonserver supervisor: its backoff (pure, with a fake clock), the supervisor around a cheap child
process with EmbeddedTriton's interface, and the process-group clean-up EmbeddedTriton.stop does for it."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from recserve.errors import ServerError
from recserve.triton.server import (
    EmbeddedTriton,
    ServerSettings,
    alive,
    end_process_group,
    free_port,
    group_members,
    shm_regions,
)
from recserve.triton.supervisor import (
    Backoff,
    RestartSchedule,
    SupervisorSettings,
    TritonState,
    TritonSupervisor,
    describe_exit,
    one_line,
)

LOGGER = "recserve.triton.supervisor"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --- the backoff -------------------------------------------------------------------------------------------


def test_the_backoff_doubles_from_half_a_second_to_ten() -> None:
    schedule = RestartSchedule(Backoff(), Clock())
    assert [schedule.next_delay() for _ in range(8)] == [0.5, 1, 2, 4, 8, 10, 10, 10]


def test_a_restart_that_stays_up_long_enough_resets_the_backoff() -> None:
    clock = Clock()
    schedule = RestartSchedule(Backoff(reset_after_s=30), clock)
    assert [schedule.next_delay() for _ in range(3)] == [0.5, 1, 2]
    schedule.came_up()
    clock.now += 30
    assert schedule.next_delay() == 0.5


def test_a_server_that_dies_again_soon_keeps_backing_off() -> None:
    clock = Clock()
    schedule = RestartSchedule(Backoff(reset_after_s=30), clock)
    schedule.came_up()  # the first start
    clock.now += 3600
    assert schedule.next_delay() == 0.5  # up an hour: a fresh start
    schedule.came_up()
    clock.now += 29.9  # crash loop: up, dead within 30 s, up, dead...
    assert schedule.next_delay() == 1
    schedule.came_up()
    clock.now += 1
    assert schedule.next_delay() == 2


def test_backoff_delays_are_capped_without_overflow_and_settings_are_checked() -> None:
    b = Backoff(initial_s=0.25, factor=3, max_s=5)
    assert [b.delay(n) for n in range(4)] == [0.25, 0.75, 2.25, 5]
    assert b.delay(10_000) == 5
    for bad in (dict(initial_s=0), dict(initial_s=2, max_s=1), dict(factor=0.5), dict(reset_after_s=-1)):
        with pytest.raises(ValueError):
            Backoff(**bad)


def test_exits_and_log_tails_are_described_on_one_line() -> None:
    assert describe_exit(-9) == "was killed by SIGKILL"
    assert describe_exit(-11) == "was killed by SIGSEGV"
    assert describe_exit(1) == "exited with code 1"
    assert one_line("I0101 a\n\n  E0101 b  \n") == "I0101 a | E0101 b"
    long = one_line("x" * 1000, limit=50)
    assert len(long) == 50 and long.startswith("...")


# --- the supervisor around a cheap child -------------------------------------------------------------------


class FakeServer:
    """EmbeddedTriton's interface around ``sleep`` in its own session; scripted restart failures."""

    grpc_url = "127.0.0.1:18001"

    def __init__(self, failures: list[BaseException] | None = None, hang: bool = False):
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self.stops = 0
        self.failures = list(failures or [])
        """Raised, one per start, by the starts after the first."""
        self.hang = hang
        """Starts after the first wait (for ``cancel``, as EmbeddedTriton waits for readiness) and fail."""

    def start(self, cancel: threading.Event | None = None) -> FakeServer:
        self.starts += 1
        if self.starts > 1 and self.failures:
            raise self.failures.pop(0)
        if self.starts > 1 and self.hang:
            assert cancel is not None and cancel.wait(30)
            raise ServerError("tritonserver start cancelled")
        self.process = subprocess.Popen(["sleep", "60"], start_new_session=True)
        return self

    def stop(self) -> None:
        p, self.process = self.process, None
        self.stops += 1
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()

    def log_tail(self, lines: int = 15) -> str:
        return "I0101 loading models\nE0101 the last words\n"


FAST = SupervisorSettings(poll_s=0.01, backoff=Backoff(initial_s=0.01, max_s=0.04))


def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


def test_a_killed_child_is_reaped_logged_once_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = FakeServer()
    with TritonSupervisor(server, FAST) as sup:
        assert (sup.state, sup.restarts, sup.last_exit) == (TritonState.UP, 0, None)
        old = server.process
        os.kill(old.pid, signal.SIGKILL)
        wait_for(lambda: sup.restarts == 1)
        assert old.returncode == -signal.SIGKILL  # poll() reaped it
        assert not Path(f"/proc/{old.pid}").exists()  # not a zombie
        new = server.process.pid
        assert new != old.pid and server.process.poll() is None
        assert sup.state == TritonState.UP
        assert sup.last_exit == f"tritonserver (pid {old.pid}) was killed by SIGKILL"
        assert sup.health() == {"state": "up", "restarts": 1, "last_exit": sup.last_exit}
        assert server.stops == 1  # the dead one's clean-up went through stop()
    (death,) = messages(caplog, logging.WARNING)
    assert "\n" not in death
    assert death.startswith(f"tritonserver (pid {old.pid}) was killed by SIGKILL; restarting it on gRPC 127.0.0.1:18001")
    assert "E0101 the last words" in death
    (restarted,) = messages(caplog, logging.INFO)
    assert restarted == f"tritonserver restarted (pid {new}, restart 1): ready again on gRPC 127.0.0.1:18001"
    assert sup.state == TritonState.STOPPED and server.process is None


def test_failed_restarts_are_retried_with_the_backoff(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = FakeServer(failures=[ServerError("port 18001 is in use; choose other ports\nmore"),
                                  OSError("exec failed")])
    with TritonSupervisor(server, FAST) as sup:
        os.kill(server.process.pid, signal.SIGKILL)
        wait_for(lambda: sup.restarts == 1)
        assert server.starts == 4 and sup.state == TritonState.UP
    death, *failed = messages(caplog, logging.WARNING)
    assert "restarting it on gRPC 127.0.0.1:18001 in 0.01 s" in death
    assert failed == ["tritonserver restart failed: port 18001 is in use; choose other ports; next try in 0.02 s",
                      "tritonserver restart failed: exec failed; next try in 0.04 s"]
    assert len(messages(caplog, logging.INFO)) == 1


def test_a_child_that_exits_by_itself_is_restarted_too(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = FakeServer()
    with TritonSupervisor(server, FAST) as sup:
        server.process.terminate()
        wait_for(lambda: sup.restarts == 1)
    assert "was killed by SIGTERM" in messages(caplog, logging.WARNING)[0]


def test_stop_ends_the_child_without_a_restart(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = FakeServer()
    sup = TritonSupervisor(server, FAST).start()
    child = server.process
    sup.stop()
    assert child.returncode is not None and server.process is None
    assert sup.state == TritonState.STOPPED
    time.sleep(0.1)
    assert server.starts == 1 and messages(caplog, logging.WARNING) == []
    assert not any(t.name == "triton-supervisor" for t in threading.enumerate())


def test_stop_during_the_backoff_wait_does_not_restart() -> None:
    server = FakeServer()
    sup = TritonSupervisor(server, SupervisorSettings(poll_s=0.01, backoff=Backoff(initial_s=5))).start()
    os.kill(server.process.pid, signal.SIGKILL)
    wait_for(lambda: sup.state == TritonState.DOWN)
    started = time.monotonic()
    sup.stop()
    assert time.monotonic() - started < 1
    assert server.starts == 1 and sup.state == TritonState.STOPPED


def test_stop_cancels_a_restart_that_waits_for_readiness(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = FakeServer(hang=True)
    sup = TritonSupervisor(server, FAST).start()
    os.kill(server.process.pid, signal.SIGKILL)
    wait_for(lambda: sup.state == TritonState.RESTARTING)
    started = time.monotonic()
    sup.stop()
    assert time.monotonic() - started < 1
    assert sup.state == TritonState.STOPPED
    assert not any("restart failed" in m for m in messages(caplog, logging.WARNING))  # a cancel is no failure


def test_a_first_start_that_fails_raises_and_watches_nothing() -> None:
    class Broken(FakeServer):
        def start(self, cancel=None):
            raise ServerError("tritonserver exited with code 1")

    sup = TritonSupervisor(Broken())
    with pytest.raises(ServerError, match="exited with code 1"):
        sup.start()
    assert sup.state == TritonState.STOPPED
    assert not any(t.name == "triton-supervisor" for t in threading.enumerate())


def test_route_prints_the_supervisor_lines_on_stderr(capsys: pytest.CaptureFixture) -> None:
    from recserve.cli import _log_to_err

    log = logging.getLogger(LOGGER)
    with _log_to_err(LOGGER):
        log.warning("tritonserver (pid 1) was killed by SIGKILL; restarting it")
        log.info("tritonserver restarted (pid 2, restart 1)")
        log.debug("not shown")
    log.warning("after the block: not on the console")
    out, err = capsys.readouterr()
    assert out == ""
    lines = [line for line in err.splitlines() if line]
    assert lines[:2] == ["warning: tritonserver (pid 1) was killed by SIGKILL; restarting it",
                         "tritonserver restarted (pid 2, restart 1)"]
    assert not log.handlers and log.propagate


# --- EmbeddedTriton's clean-up of a dead server's process group ---------------------------------------------

MAPS_SHM = ("import mmap, sys, time; f = open(sys.argv[1], 'w+b'); f.truncate(4096); "
            "m = mmap.mmap(f.fileno(), 4096); print('mapped', flush=True); time.sleep(60)")
"""A stand-in for a python backend stub: maps a /dev/shm region and stays."""


@pytest.fixture
def dead_leader_with_a_stub():
    """A group like a SIGKILLed tritonserver's: the leader (``sh``) reaped, a 'stub' mapping shared memory."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("needs /dev/shm")
    region = Path(f"/dev/shm/triton_recserve_test_{uuid.uuid4()}")
    leader = subprocess.Popen(["sh", "-c", '"$@" & echo $!; exec sleep 60', "sh", sys.executable, "-c", MAPS_SHM,
                               str(region)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    stub = int(leader.stdout.readline())
    assert leader.stdout.readline().strip() == "mapped"
    os.kill(leader.pid, signal.SIGKILL)
    leader.wait()
    yield leader, stub, region
    try:
        os.kill(stub, signal.SIGKILL)
    except ProcessLookupError:
        pass
    region.unlink(missing_ok=True)


def test_the_group_of_a_dead_leader_is_found_and_ended(dead_leader_with_a_stub) -> None:
    leader, stub, region = dead_leader_with_a_stub
    assert group_members(leader.pid) == [stub]
    assert shm_regions([stub]) == {region}
    assert end_process_group(leader.pid, {region}) == [stub]
    assert not alive(stub) and group_members(leader.pid) == []
    assert not region.exists()
    assert end_process_group(leader.pid) == []  # nothing left: nothing to do


def test_embedded_triton_stop_ends_what_a_dead_server_left(dead_leader_with_a_stub, tmp_path: Path) -> None:
    leader, stub, region = dead_leader_with_a_stub
    server = EmbeddedTriton(ServerSettings(tmp_path))
    server.process = leader  # as the supervisor finds it: exited, reaped
    server.stop()
    assert server.process is None
    assert not alive(stub) and not region.exists()


def test_waiting_for_readiness_stops_when_cancelled(tmp_path: Path) -> None:
    server = EmbeddedTriton(ServerSettings(tmp_path, http_port=free_port()))
    server.process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    started = time.monotonic()
    try:
        with pytest.raises(ServerError, match="cancelled"):
            server.wait_ready(30, cancel)
        assert time.monotonic() - started < 2
    finally:
        server.stop()


def test_a_niceness_runs_tritonserver_under_nice_and_none_runs_it_bare(tmp_path: Path) -> None:
    from recserve.triton.server import TritonInstall

    install = TritonInstall(Path("/opt/triton/bin/tritonserver"), Path("/opt/triton/lib"), Path("/b"), Path("/s"))
    bare = EmbeddedTriton(ServerSettings(tmp_path)).command(tmp_path / "backends", install)
    niced = EmbeddedTriton(ServerSettings(tmp_path, nice=10)).command(tmp_path / "backends", install)
    assert bare[0] == str(install.binary)
    assert niced[:4] == ["nice", "-n", "10", str(install.binary)] and niced[4:] == bare[1:]
