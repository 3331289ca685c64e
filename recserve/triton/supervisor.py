"""Keep the embedded tritonserver running beside the router (``recserve route --triton-repo``).

:class:`TritonSupervisor` starts an :class:`~recserve.triton.server.EmbeddedTriton` and watches it from a
daemon thread. When tritonserver exits on its own (crash, OOM kill, SIGKILL) the supervisor reaps it, ends
what is left of its process group (the python backend stubs and their shared memory, through
``EmbeddedTriton.stop``), logs one WARNING line with the exit status and the end of Triton's log, and starts
it again on the same ports (the router's ``triton_url`` points at that gRPC port), with exponential backoff
(:class:`Backoff`, :class:`RestartSchedule`). A restart that fails is retried; nothing here raises into the
router. ``stop()`` ends the watch and the server without a restart.

Imports only the standard library and ``recserve.triton.server``: the router process stays lean.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

log = logging.getLogger(__name__)


class TritonState(str, Enum):
    UP = "up"
    """Ready (started and not seen dead since)."""
    DOWN = "down"
    """Exited on its own; waiting out the backoff before the next start."""
    RESTARTING = "restarting"
    """A restart is under way (waiting for readiness)."""
    STOPPED = "stopped"
    """Not supervised: before ``start()`` or after ``stop()``."""


@dataclass(frozen=True)
class Backoff:
    """How long to wait before each restart: ``initial_s``, doubling (``factor``) up to ``max_s``."""

    initial_s: float = 0.5
    """Wait before the first restart after a server that had been up a while died."""
    factor: float = 2.0
    """Each further consecutive failure (a restart that failed, or a server that died again soon) multiplies it."""
    max_s: float = 10.0
    """The longest wait between two tries."""
    reset_after_s: float = 30.0
    """A server that stayed up this long counts as healthy: its death starts again at ``initial_s``."""

    def __post_init__(self) -> None:
        if not (self.initial_s > 0 and self.max_s >= self.initial_s and self.factor >= 1 and self.reset_after_s >= 0):
            raise ValueError(f"backoff needs 0 < initial_s <= max_s, factor >= 1, reset_after_s >= 0: {self}")

    def delay(self, failures: int) -> float:
        """The wait before the try that follows ``failures`` consecutive failures (0: the first try)."""
        return min(self.max_s, self.initial_s * self.factor ** min(max(failures, 0), 64))  # no float overflow


class RestartSchedule:
    """The backoff as the supervisor uses it, with an injected clock (pure apart from it).

    ``next_delay()`` when the server died or a restart failed; ``came_up()`` when a start succeeded. The
    count of consecutive failures resets when the server then stays up ``reset_after_s``.
    """

    def __init__(self, backoff: Backoff, clock: Callable[[], float] = time.monotonic):
        self.backoff = backoff
        self.clock = clock
        self.failures = 0
        self.up_since: float | None = None

    def came_up(self) -> None:
        self.up_since = self.clock()

    def next_delay(self) -> float:
        if self.up_since is not None and self.clock() - self.up_since >= self.backoff.reset_after_s:
            self.failures = 0
        self.up_since = None
        delay = self.backoff.delay(self.failures)
        self.failures += 1
        return delay


@dataclass(frozen=True)
class SupervisorSettings:
    """How the supervisor watches and restarts tritonserver."""

    poll_s: float = 0.2
    """How often the child is polled (``Popen.poll``, which also reaps it once it exited)."""
    backoff: Backoff = field(default_factory=Backoff)
    """The wait before each restart."""
    log_tail_lines: int = 3
    """Lines of Triton's log quoted (on one line) in the WARNING about its death."""
    stop_join_s: float = 30.0
    """On ``stop()``, how long to wait for the watch thread (a restart in progress is cancelled first)."""


class Supervised(Protocol):
    """What the supervisor needs of the server: :class:`~recserve.triton.server.EmbeddedTriton` has it."""

    process: subprocess.Popen | None

    @property
    def grpc_url(self) -> str: ...

    def start(self, cancel: threading.Event | None = None) -> object: ...

    def stop(self) -> None: ...

    def log_tail(self, lines: int = 15) -> str: ...


def describe_exit(returncode: int) -> str:
    """``exited with code 1`` / ``was killed by SIGKILL`` (Popen's negative return codes are signals)."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def one_line(text: str, limit: int = 400) -> str:
    """Lines joined with `` | ``, at most ``limit`` characters (the end kept): a log tail for one log line."""
    joined = " | ".join(line.strip() for line in text.splitlines() if line.strip())
    return joined if len(joined) <= limit else "..." + joined[-(limit - 3):]


class TritonSupervisor:
    """Owns a server (an :class:`~recserve.triton.server.EmbeddedTriton`) and restarts it when it dies.

    A context manager: ``start()`` starts the server (its errors raise, as ``EmbeddedTriton.start`` does) and
    the watch thread; ``stop()`` ends both. ``state``, ``restarts`` and ``last_exit`` are for health reports.
    """

    def __init__(self, server: Supervised, settings: SupervisorSettings | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.server = server
        self.settings = settings or SupervisorSettings()
        self._schedule = RestartSchedule(self.settings.backoff, clock)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._state = TritonState.STOPPED
        self._restarts = 0
        self._last_exit: str | None = None

    @property
    def state(self) -> TritonState:
        with self._lock:
            return self._state

    @property
    def restarts(self) -> int:
        """Successful restarts since ``start()``."""
        with self._lock:
            return self._restarts

    @property
    def last_exit(self) -> str | None:
        """How the server last died (``tritonserver (pid N) was killed by SIGKILL``); None if it has not."""
        with self._lock:
            return self._last_exit

    def health(self) -> dict[str, object]:
        with self._lock:
            return {"state": self._state.value, "restarts": self._restarts, "last_exit": self._last_exit}

    def _set(self, state: TritonState) -> None:
        with self._lock:
            self._state = state

    def start(self) -> TritonSupervisor:
        if self._thread is not None:
            raise RuntimeError("the supervisor is already running")
        self._stopping.clear()
        self.server.start()
        self._schedule.came_up()
        self._set(TritonState.UP)
        self._thread = threading.Thread(target=self._watch, name="triton-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the watch (cancelling a restart in progress), then stop the server; no restart follows."""
        self._stopping.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(self.settings.stop_join_s)
        self.server.stop()
        self._set(TritonState.STOPPED)

    def __enter__(self) -> TritonSupervisor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _watch(self) -> None:
        while not self._stopping.wait(self.settings.poll_s):
            try:
                process = self.server.process
                if process is not None and process.poll() is not None:  # poll() reaped it
                    self._recover(process)
            except Exception:  # never let the watch die: the router would lose its Triton for good
                log.exception("tritonserver supervisor: unexpected error (watching on)")

    def _recover(self, process: subprocess.Popen) -> None:
        exit_text = f"tritonserver (pid {process.pid}) {describe_exit(process.returncode)}"
        try:
            tail = one_line(self.server.log_tail(self.settings.log_tail_lines))  # before stop() removes the log
        except Exception as e:
            tail = f"(unreadable: {e})"
        try:
            self.server.stop()  # its process group (python backend stubs, shared memory) and temporary files
        except Exception:  # the restart is what matters
            log.exception("tritonserver supervisor: cleaning up after the dead server failed")
        with self._lock:
            self._state = TritonState.DOWN
            self._last_exit = exit_text
        delay = self._schedule.next_delay()
        log.warning("%s; restarting it on gRPC %s in %g s; its log ended: %s", exit_text, self.server.grpc_url,
                    delay, tail or "(empty)")
        while not self._stopping.wait(delay):
            self._set(TritonState.RESTARTING)
            try:
                self.server.start(cancel=self._stopping)
            except Exception as e:  # ServerError: port not free yet, not ready in time, exited; anything else
                if self._stopping.is_set():
                    return
                self._set(TritonState.DOWN)
                delay = self._schedule.next_delay()
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                log.warning("tritonserver restart failed: %s; next try in %g s", reason, delay)
                continue
            self._schedule.came_up()
            with self._lock:
                self._state = TritonState.UP
                self._restarts += 1
                restarts = self._restarts
            pid = self.server.process.pid if self.server.process is not None else "?"
            log.info("tritonserver restarted (pid %s, restart %d): ready again on gRPC %s", pid, restarts,
                        self.server.grpc_url)
            return
