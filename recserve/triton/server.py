"""Start the real ``tritonserver`` binary from the nvidia-pytriton wheel, on CPU.

The wheel ships only Triton's python backend. :func:`prepare_backends` lays out a backend
directory holding that backend (``python/``) and recserve's python-based ``onnxruntime`` backend
(``onnxruntime/model.py``), so model configs written for the official container
(``backend: "onnxruntime"``) run unchanged here.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from recserve.errors import ServerError

if TYPE_CHECKING:
    import threading
    from collections.abc import Iterable

BACKENDS = Path(__file__).resolve().parent / "backends"


@dataclass
class ServerSettings:
    """How to start the embedded Triton."""

    repository: Path
    """The model repository (``<model>/config.pbtxt``, ``<model>/<version>/model.onnx``)."""
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    model_control: Literal["none", "poll", "explicit"] = "none"
    """``none``: load everything at start; ``poll``: watch the repository; ``explicit``: load/unload by API."""
    load_models: list[str] = field(default_factory=list)
    """With ``explicit``: models to load at start (``*`` for all)."""
    poll_seconds: int = 2
    log_verbose: int = 0
    startup_timeout: float = 90.0
    """Seconds to wait for ``/v2/health/ready``."""
    log_file: Path | None = None
    """Where Triton's own log goes (a temporary file when None)."""
    summary_latencies: bool = True
    """Export per-version latency quantiles (``nv_inference_request_summary_us``): the operator's p99."""
    summary_quantiles: str = "0.5:0.05,0.99:0.005"
    """``quantile:error`` pairs Triton tracks for those summaries. Each request feeds five of them
    (request, queue, compute input/infer/output), so fewer quantiles cost less: Triton's default
    four took about 10% of the batched throughput on 2 cores; the operator reads only 0.99."""
    cache_mb: int = 0
    """Size of Triton's local response cache (used by models built with ``response_cache: true``); 0: none."""
    nice: int = 0
    """Niceness added to tritonserver and its python stubs (``nice -n``, and its session's too: see
    :func:`renice_session`). Above 0 where Triton shares a host's cores with latency-bound processes (a router
    on an edge box, the fault tests): its model loads then wait for them, not they for it."""

    @classmethod
    def on_free_ports(cls, repository: Path, **kw) -> ServerSettings:
        """Settings whose gRPC, HTTP and metrics ports are free local ports (a Triton beside others)."""
        return cls(Path(repository), grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(), **kw)


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    libs: Path
    python_backend: Path
    stub: Path


def find_tritonserver() -> TritonInstall:
    """Locate the binary, its libraries and the python backend inside the nvidia-pytriton wheel."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")  # found, not imported: we need its files, not its client stack
    if spec is None or spec.origin is None:
        raise ServerError("tritonserver is not installed: `pip install 'recserve[serve]'` (nvidia-pytriton)")
    root = Path(spec.origin).resolve().parent / "tritonserver"
    libs = root.parent.parent / "nvidia_pytriton.libs"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(root / "bin" / "tritonserver", libs, root / "backends" / "python",
                            root / "python_backend_stubs" / version / "triton_python_backend_stub")
    missing = [p for p in (install.binary, install.libs, install.python_backend, install.stub) if not p.exists()]
    if missing:
        raise ServerError(f"the nvidia-pytriton install is incomplete (missing {missing[0]}); reinstall it")
    return install


def prepare_backends(dest: Path, install: TritonInstall | None = None) -> Path:
    """Write a backend directory with Triton's python backend and recserve's python-based backends."""
    install = install or find_tritonserver()
    python = dest / "python"
    python.mkdir(parents=True, exist_ok=True)
    for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(install.python_backend / f, python / f)
    shutil.copy2(install.stub, python / "triton_python_backend_stub")
    for backend in BACKENDS.iterdir():
        if (backend / "model.py").exists():
            (dest / backend.name).mkdir(exist_ok=True)
            shutil.copy2(backend / "model.py", dest / backend.name / "model.py")
    return dest


def renice_session(pid: int, nice: int) -> None:
    """Give the session that ``pid`` leads the niceness ``nice`` too, where the kernel groups by session.

    With autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``, on in many distributions' kernels)
    each session is a group that shares the cores equally with every other, and its processes' niceness counts
    only among themselves: tritonserver, started in a session of its own, would take half the cores from a
    router beside it whatever ``nice -n`` said. The group's own niceness (``/proc/PID/autogroup``) is what
    weighs against the others. Nothing to do, and nothing done, where the file does not exist or refuses."""
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))
    except OSError:
        pass


FREE_PORTS = range(20_000, 32_000)
"""Where :func:`free_ports` looks: above Ray's worker ports (10002-19999) and below Linux's ephemeral range
(32768-60999). Every outgoing connection takes its local port from the ephemeral range, so a port there that
``bind(0)`` reported free can be taken by one (Ray opens many) before the server binds it."""


def free_port() -> int:
    """A free local port for a server this process starts next (see :data:`FREE_PORTS`)."""
    return free_ports(1)


_RANDOM = random.SystemRandom()
"""Draws ports whatever a library did to ``random``'s global seed."""
_HANDED_OUT: set[int] = set()
"""Ports this process was given: a port chosen but not yet bound (a router config written before the server
starts) is not given out again."""


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive free local ports (one per direct-ingress router replica), drawn at random
    from :data:`FREE_PORTS` so that processes choosing at once rarely choose alike, and never one this process
    was given before. Free means bindable without ``SO_REUSEADDR``: no listener and no connection (not even in
    TIME_WAIT) on it."""
    for first in _RANDOM.sample(range(FREE_PORTS.start, FREE_PORTS.stop - n), 200):
        ports = range(first, first + n)
        if not _HANDED_OUT.intersection(ports) and all(_unused(p) for p in ports):
            _HANDED_OUT.update(ports)
            return first
    raise ServerError(f"no {n} consecutive free ports between {FREE_PORTS.start} and {FREE_PORTS.stop}")


def _unused(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT from a stopped server is no conflict
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_listening(port: int) -> bool:
    """Whether a server accepts connections on the local port (a bind may still fail without one: TIME_WAIT)."""
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (exists and is not a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of the process group ``pgid``: a stopped tritonserver's python backend stubs."""
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry))
    return found


def shm_regions(pids: list[int]) -> set[Path]:
    """Triton's shared-memory files (``/dev/shm/triton_*``) that these processes map: a python backend stub
    removes its region when it exits on its own, but not when it is killed."""
    regions = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        for line in maps.splitlines():
            path = line.split(maxsplit=5)[5:]
            if path and path[0].startswith("/dev/shm/triton_"):
                regions.add(Path(path[0].removesuffix(" (deleted)")))
    return regions


def end_process_group(pgid: int, regions: Iterable[Path] = (), grace: float = 5.0) -> list[int]:
    """SIGKILL what is left of the process group ``pgid`` (its leader already gone), wait up to ``grace``
    seconds for it to go, remove the shared-memory ``regions`` it held; the pids it found."""
    members = group_members(pgid)
    if members:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
    for region in regions:
        region.unlink(missing_ok=True)
    return members


class EmbeddedTriton:
    """The real tritonserver as a child process; a context manager that waits for readiness.

    It runs in its own session (process group), with its python backend stubs: :meth:`stop` ends the
    group, also after tritonserver itself died (a crashed server's stubs live on otherwise).
    """

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.process: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.log_path: Path | None = None
        self.skipped: dict[str, str] = {}
        """Models of the repository left out because they (or a model they use) are not built."""

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.settings.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.settings.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.metrics_port}/metrics"

    def command(self, backend_dir: Path, install: TritonInstall) -> list[str]:
        s = self.settings
        cmd = ["nice", "-n", str(s.nice)] if s.nice else []
        cmd += [str(install.binary), f"--model-repository={Path(s.repository).resolve()}",
                f"--backend-directory={backend_dir}", f"--grpc-port={s.grpc_port}", f"--http-port={s.http_port}",
                f"--metrics-port={s.metrics_port}", f"--model-control-mode={s.model_control}",
                f"--log-verbose={s.log_verbose}", "--allow-metrics=true", "--allow-gpu-metrics=false",
                "--strict-readiness=true", "--exit-timeout-secs=10"]
        if s.summary_latencies:
            cmd += ["--metrics-config=summary_latencies=true", f"--metrics-config=summary_quantiles={s.summary_quantiles}"]
        if s.cache_mb > 0:
            cache_dir = Path(install.binary).parent.parent / "caches"
            cmd += [f"--cache-directory={cache_dir}", f"--cache-config=local,size={s.cache_mb << 20}"]
        if s.model_control == "poll":
            cmd.append(f"--repository-poll-secs={s.poll_seconds}")
        if s.model_control == "explicit":
            cmd += [f"--load-model={m}" for m in s.load_models]
        return cmd

    def environment(self, install: TritonInstall) -> dict[str, str]:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(install.libs), env.get("LD_LIBRARY_PATH")]))
        # the python backend's stub runs this interpreter's environment (onnxruntime, numpy)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def start(self, cancel: threading.Event | None = None) -> EmbeddedTriton:
        """Start tritonserver and wait for readiness; ServerError (and nothing left running) when it does not
        come up, or when ``cancel`` is set meanwhile. It may be started again after :meth:`stop`."""
        repo = Path(self.settings.repository)
        if not repo.is_dir():
            raise ServerError(f"model repository {repo} does not exist; create one with `recserve build`")
        install = find_tritonserver()
        for port in (self.settings.grpc_port, self.settings.http_port, self.settings.metrics_port):
            if not port_free(port):
                raise ServerError(f"port {port} is in use; choose other --grpc-port/--http-port/--metrics-port")
        if self.settings.model_control == "none":
            self.settings = self._only_servable(repo)
        self._tmp = tempfile.TemporaryDirectory(prefix="recserve-triton-")
        backend_dir = prepare_backends(Path(self._tmp.name) / "backends", install)
        self.log_path = self.settings.log_file or Path(self._tmp.name) / "triton.log"
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command(backend_dir, install), stdout=log, stderr=subprocess.STDOUT,
                                        env=self.environment(install), start_new_session=True)
        log.close()
        if self.settings.nice:
            renice_session(self.process.pid, self.settings.nice)
        try:
            self.wait_ready(self.settings.startup_timeout, cancel)
        except BaseException:  # ServerError, and Ctrl-C while waiting: never leave tritonserver behind
            self.stop()
            raise
        return self

    def _only_servable(self, repo: Path) -> ServerSettings:
        """Load every servable model (explicitly, when some are left out); ServerError when none is."""
        from dataclasses import replace

        from recserve.triton.repository_plan import plan

        p = plan(repo)
        if p.broken:
            name, why = next(iter(p.broken.items()))
            raise ServerError(f"model {name}: {why}; fix it or move the model out of the repository")
        self.skipped = p.skipped
        if not p.servable:
            first = next(iter(p.skipped.items()), None)
            raise ServerError(f"model repository {repo} has nothing to serve"
                              + (f" ({first[0]}: {first[1]})" if first else "; build a model into it with `recserve build`"))
        if not p.skipped:
            return self.settings
        return replace(self.settings, model_control="explicit", load_models=p.servable)

    def log_tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        errors = [line for line in text if line.startswith("E") or "error" in line.lower()]
        tail = [line for line in text[-lines:] if line not in errors]
        return "\n".join(errors[-lines:] + tail)

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float, cancel: threading.Event | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cancel is not None and cancel.is_set():
                raise ServerError("tritonserver start cancelled")
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode}:\n{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.2)
        raise ServerError(f"tritonserver was not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGINT (Triton drains in-flight requests and unloads models), then SIGKILL if it hangs; then SIGKILL
        what is left of its process group (the python backend stubs of a server that died) and its shared memory."""
        p, self.process = self.process, None
        if p is not None:
            regions = shm_regions(group_members(p.pid))  # before any SIGKILL: a killed stub leaves its region
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGINT)
                    p.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
                except ProcessLookupError:
                    pass
            end_process_group(p.pid, regions)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedTriton:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
