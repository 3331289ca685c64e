"""A real etcd + kube-apiserver on loopback for the ``k8s`` tests (``make k8s-tools`` builds them).

``apiserver`` (session scope) starts both as ``tools/k8s/smoke.sh`` does: free loopback ports, a temp dir,
a service-account key pair, a static token file, ``--authorization-mode=RBAC``, ``--anonymous-auth=false``,
``--endpoint-reconciler-type=none``, PodSecurity admission, and an audit log of every request the operator's
identity makes (``ApiServer.audit``). It waits for /readyz, yields an :class:`ApiServer`,
and stops both at teardown (SIGTERM, then SIGKILL after 10 s). No controller-manager, scheduler or kubelet:
objects are stored, validated and admitted, but nothing acts on them.

Use it from a test module with ``apiserver = apiserver_fixtures.apiserver`` (pytest finds the fixture by
name), and see tests/conftest.py: ``k8s`` tests that use this fixture do not need ``KUBECONFIG``.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from recserve.triton.server import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".tools" / "bin"

ADMIN_USER = "admin"
OPERATOR_USER = "system:serviceaccount:recserve:recserve-operator"
"""The operator's ServiceAccount identity, as a static token user (no controller mints real SA tokens here)."""
OPERATOR_GROUPS = ("system:serviceaccounts", "system:serviceaccounts:recserve", "system:authenticated")

READY_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0


@dataclass
class ApiServer:
    url: str
    token: str
    """the admin token (group system:masters)"""
    kubeconfig: Path
    """an admin kubeconfig file"""
    workdir: Path
    tokens: dict[str, str] = field(default_factory=dict)
    """user name -> static token, for every user in the token file"""
    ca_file: Path | None = None

    def audit(self, user: str = OPERATOR_USER) -> list[dict]:
        """Every request ``user`` made so far, as the server's audit log recorded it when the response was sent
        (``verb``, ``objectRef``, ``responseStatus.code``, ...). Only ``OPERATOR_USER`` is audited."""
        path = self.workdir / "audit.log"
        if not path.exists():
            return []
        events = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
        return [e for e in events if e.get("stage") == "ResponseComplete" and e["user"]["username"] == user]

    def kubeconfig_for(self, user: str) -> Path:
        """A kubeconfig file for ``user``, one of the static token file's users (``OPERATOR_USER``, ...)."""
        if user not in self.tokens:
            raise KeyError(f"{user!r} is not in the static token file: {sorted(self.tokens)}")
        safe = "".join(c if c.isalnum() else "-" for c in user)
        path = self.workdir / f"kubeconfig-{safe}.yaml"
        _write_kubeconfig(path, self.url, user, self.tokens[user], self.ca_file)
        return path

    def client(self, user: str = ADMIN_USER):
        """A ``kubernetes.client.ApiClient`` for ``user`` (the admin by default)."""
        from kubernetes import config

        path = self.kubeconfig if user == ADMIN_USER else self.kubeconfig_for(user)
        return config.new_client_from_config(config_file=str(path))


def _write_kubeconfig(path: Path, url: str, user: str, token: str, ca_file: Path | None) -> None:
    cluster: dict = {"server": url}
    if ca_file is not None:
        cluster["certificate-authority"] = str(ca_file)
    else:
        cluster["insecure-skip-tls-verify"] = True
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "local",
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": user}}],
    }))


def ensure_crd(api_client, body: dict, timeout_s: float = 60.0) -> None:
    """Install the CRD ``body`` unless a test before did (helm installs the chart's own), and wait until it is
    Established and its endpoint serves."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    ext = client.ApiextensionsV1Api(api_client)
    try:
        ext.create_custom_resource_definition(body)
    except ApiException as e:
        if e.status != 409:
            raise
    deadline = time.monotonic() + timeout_s
    name = body["metadata"]["name"]
    while True:
        conditions = ext.read_custom_resource_definition(name).status.conditions or []
        if any(c.type == "Established" and c.status == "True" for c in conditions):
            break
        assert time.monotonic() < deadline, f"CRD {name} not Established after {timeout_s:g} s: {conditions}"
        time.sleep(0.1)
    spec = body["spec"]
    version = next(v["name"] for v in spec["versions"] if v.get("served", True))
    custom = client.CustomObjectsApi(api_client)
    while True:  # the new group's endpoint can lag Established by a moment
        try:
            if spec["scope"] == "Namespaced":
                custom.list_namespaced_custom_object(spec["group"], version, "default", spec["names"]["plural"])
            else:
                custom.list_cluster_custom_object(spec["group"], version, spec["names"]["plural"])
            return
        except ApiException as e:
            assert e.status == 404 and time.monotonic() < deadline, e
            time.sleep(0.1)


def stop(proc: subprocess.Popen | None) -> None:
    """SIGTERM, then SIGKILL after ``STOP_GRACE_S``; reaps the process either way."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait(check, proc: subprocess.Popen, what: str, log: Path, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if check():
            return time.monotonic() - t0
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s:\n{_tail(log)}")


def _get(url: str, token: str | None = None, ctx: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, urllib.error.URLError):
        return 0, b""


def _ca_of(certs: Path, url: str) -> Path | None:
    """kube-apiserver's self-signed serving cert (``--cert-dir``) comes with its own CA in the same file;
    use it to verify TLS when it does verify 127.0.0.1 (insecure-skip-tls-verify otherwise)."""
    crt = certs / "apiserver.crt"
    if not crt.exists():
        return None
    try:
        ctx = ssl.create_default_context(cafile=str(crt))
        with urllib.request.urlopen(url + "/readyz", timeout=5, context=ctx):
            return crt
    except urllib.error.HTTPError:
        return crt  # 401 without a token: the TLS handshake, and the certificate check, passed
    except (OSError, urllib.error.URLError, ssl.SSLError):
        return None


@pytest.fixture(scope="module")
def apiserver(tmp_path_factory):
    """A real etcd and kube-apiserver for one test module, stopped after it. Each module binds this fixture
    (``apiserver = apiserver_fixtures.apiserver``), so each gets a server of its own; at session scope, each
    of those lived to the end of the whole suite (four pairs idling beside the fault and load tests)."""
    for b in ("etcd", "kube-apiserver"):
        if not os.access(BIN / b, os.X_OK):
            pytest.skip(f"run `make k8s-tools` first: {BIN / b} is missing (a real kube-apiserver and etcd, "
                        "see tools/k8s/README.md)")
    t = tmp_path_factory.mktemp("apiserver")
    etcd = api = None
    logs = []
    try:
        # ---- etcd
        client_port, peer_port = free_port(), free_port()
        etcd_url, peer_url = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
        etcd_log = t / "etcd.log"
        logs.append(etcd_log)
        with etcd_log.open("wb") as out:
            etcd = subprocess.Popen(
                [str(BIN / "etcd"), "--name=e2e", f"--data-dir={t / 'etcd'}",
                 f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
                 f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
                 f"--initial-cluster=e2e={peer_url}", "--log-level=warn"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def etcd_healthy() -> bool:
            code, body = _get(f"{etcd_url}/health")
            return code == 200 and json.loads(body or b"{}").get("health") == "true"

        _wait(etcd_healthy, etcd, "etcd", etcd_log, 30)

        # ---- kube-apiserver
        subprocess.run(["openssl", "genrsa", "-out", str(t / "sa.key"), "2048"], check=True, capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", str(t / "sa.key"), "-pubout", "-out", str(t / "sa.pub")],
                       check=True, capture_output=True)
        tokens = {ADMIN_USER: secrets.token_hex(16), OPERATOR_USER: secrets.token_hex(16)}
        (t / "tokens.csv").write_text(
            f'{tokens[ADMIN_USER]},{ADMIN_USER},admin-uid,"system:masters"\n'
            f'{tokens[OPERATOR_USER]},{OPERATOR_USER},recserve-operator-uid,"{",".join(OPERATOR_GROUPS)}"\n')
        (t / "audit-policy.yaml").write_text(yaml.safe_dump({
            "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
            "rules": [{"level": "Metadata", "users": [OPERATOR_USER]}, {"level": "None"}]}))
        port = free_port()
        url = f"https://127.0.0.1:{port}"
        api_log = t / "apiserver.log"
        logs.append(api_log)
        with api_log.open("wb") as out:
            api = subprocess.Popen(
                [str(BIN / "kube-apiserver"),
                 f"--etcd-servers={etcd_url}",
                 "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={port}",
                 "--endpoint-reconciler-type=none",
                 f"--cert-dir={t / 'certs'}",
                 "--service-account-issuer=https://kubernetes.default.svc",
                 f"--service-account-key-file={t / 'sa.pub'}", f"--service-account-signing-key-file={t / 'sa.key'}",
                 f"--token-auth-file={t / 'tokens.csv'}",
                 "--authorization-mode=RBAC",
                 "--enable-admission-plugins=PodSecurity",
                 "--service-cluster-ip-range=10.96.0.0/24",
                 "--anonymous-auth=false",
                 "--allow-privileged=true",  # as kubeadm and managed clusters run it: Pod Security decides
                 f"--audit-policy-file={t / 'audit-policy.yaml'}", f"--audit-log-path={t / 'audit.log'}",
                 "--audit-log-mode=blocking"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        took = _wait(lambda: _get(f"{url}/readyz", tokens[ADMIN_USER], insecure)[0] == 200, api, "kube-apiserver",
                     api_log, READY_TIMEOUT_S)
        ca = _ca_of(t / "certs", url)
        kubeconfig = t / "kubeconfig-admin.yaml"
        _write_kubeconfig(kubeconfig, url, ADMIN_USER, tokens[ADMIN_USER], ca)
        print(f"\nkube-apiserver ready on {url} after {took:.1f} s (TLS: {'CA ' + str(ca) if ca else 'insecure'})")
        yield ApiServer(url=url, token=tokens[ADMIN_USER], kubeconfig=kubeconfig, workdir=t, tokens=tokens,
                        ca_file=ca)
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    finally:
        stop(api)
        stop(etcd)
