"""Routing policy: per model, version -> traffic weight, a shadow percentage and how requests are assigned.

A version is a Triton version of the model (``"2"``) or a version of another Triton model
(``"ranker_trt:1"``): Triton serves every version of a model with one platform, so an ONNX -> TensorRT
canary splits ``ranker``'s traffic between its ONNX version and the TensorRT model built under its own name.

The operator writes it (a file, e.g. a mounted ConfigMap); the router reads it once per request and
picks a version. By default the pick is sticky: a hash of the request's user id (salted per rollout)
places the user in [0, 1), so one user sees one version for the life of a split. Choices are pure
functions of the policy and a number in [0, 1), so tests need no randomness.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from recserve.errors import ConfigError
from recserve.specs import read_mapping, validate

log = logging.getLogger(__name__)


class Assignment(BaseModel):
    """How a request is placed in a model's traffic split."""

    model_config = ConfigDict(extra="forbid")
    by: Literal["hash", "random"] = Field(
        "hash", description="hash: a hash of the request key (a user stays on one version); random: a draw per request")
    key: str = Field("user_id", min_length=1, description="the user feature whose value is hashed; a request "
                     "without it is drawn at random (and counted)")
    salt: str = Field("", description="mixed into the hash; a new salt (the operator sets one per rollout) "
                      "reshuffles which users see the candidate")


class ModelPolicy(BaseModel):
    """Traffic split of one model."""

    model_config = ConfigDict(extra="forbid")
    assignment: Assignment = Field(default_factory=Assignment)
    versions: dict[str, float] = Field(description="Triton version -> weight (relative, >= 0); 'model:version' "
                                       "names a version of another Triton model")
    shadow_percent: float = Field(0.0, ge=0.0, le=100.0, description="share of requests also sent to the shadow version")
    shadow_version: str | None = Field(None, description="version that receives shadow traffic (not returned)")

    @field_validator("versions", mode="before")
    @classmethod
    def _version_keys(cls, v: Any) -> Any:
        """YAML reads `1: 90` with an int key; versions are names: make them strings."""
        return {str(k): w for k, w in v.items()} if isinstance(v, dict) else v

    @field_validator("shadow_version", mode="before")
    @classmethod
    def _version_name(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) else v

    @model_validator(mode="after")
    def _weights(self) -> ModelPolicy:
        if not self.versions:
            raise ValueError("versions must name at least one version")
        named = [*self.versions, *filter(None, [self.shadow_version])]
        bad = next((k for k in named if not all(split_target("model", k))), None)
        if bad is not None:
            raise ValueError(f"version {bad!r}: give a Triton version ('2') or another model's ('ranker_trt:1')")
        if any(w < 0 for w in self.versions.values()) or sum(self.versions.values()) <= 0:
            raise ValueError("version weights must be >= 0 and not all 0")
        if self.shadow_percent > 0 and not self.shadow_version:
            raise ValueError("shadow_percent > 0 needs shadow_version")
        return self


class RoutingPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: dict[str, ModelPolicy] = Field(default_factory=dict)
    unknown_inputs: Literal["report", "refuse"] = Field(
        "report", description="unknown item ids and user feature keys: report them (metrics and the response's "
        "reason) and rank anyway, or refuse the request (INVALID_ARGUMENT)")


def assignment_point(policy: RoutingPolicy, model: str, user: Mapping[str, str], u: float) -> tuple[float, bool]:
    """Where a request falls in ``model``'s split, in [0, 1), and whether it was hashed (sticky). Hashed:
    SHA-256 of the salt and the key's value, so a user keeps the point across requests and replicas.
    Otherwise (``by: random``, or the key missing from the request): ``u``, a uniform draw."""
    p = policy.models.get(model)
    if p is None or p.assignment.by == "random":
        return u, False
    value = user.get(p.assignment.key)
    if not value:
        return u, False
    digest = hashlib.sha256(f"{p.assignment.salt}\x00{value}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64, True


def choose_version(policy: RoutingPolicy, model: str, u: float) -> str:
    """The version for a request, by weight; ``u`` is uniform in [0, 1). Empty: Triton's default."""
    p = policy.models.get(model)
    if p is None:
        return ""
    total = sum(p.versions.values())
    acc = 0.0
    for version, weight in sorted(p.versions.items()):
        acc += weight / total
        if u < acc:
            return version
    return max((v for v, w in p.versions.items() if w > 0), key=lambda v: (p.versions[v], v))


def split_target(model: str, version: str) -> tuple[str, str]:
    """The Triton model and version a policy version names: ``"2"`` is version 2 of ``model``, ``"ranker_trt:1"``
    version 1 of Triton model ``ranker_trt``. (Triton model names have no ':'.)"""
    other, sep, number = version.partition(":")
    return (other, number) if sep else (model, version)


def target_key(model: str, triton_model: str, version: str) -> str:
    """The inverse of :func:`split_target`: version ``version`` of ``triton_model`` as ``model``'s policy names it."""
    return version if triton_model == model else f"{triton_model}:{version}"


def shadow_version(policy: RoutingPolicy, model: str, served: str, u: float) -> str | None:
    """The version to mirror this request to, if any (never the one that served it)."""
    p = policy.models.get(model)
    if p is None or not p.shadow_version or u * 100.0 >= p.shadow_percent or p.shadow_version == served:
        return None
    return p.shadow_version


def parse_policy(text: str, source: str = "policy") -> RoutingPolicy:
    return validate(RoutingPolicy, read_mapping(text, source, "a routing policy is a mapping with 'models'"), source)


def write_policy(policy: RoutingPolicy, path: Path) -> None:
    """Atomically replace the policy file (readers never see half a file): written to a temporary file of its own
    in the same directory (concurrent writers never share one), then renamed over the policy."""
    import os
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(policy.model_dump(exclude_none=True), indent=2))
        os.chmod(tmp, 0o644)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class PolicyWatcher:
    """Re-reads the policy file when it changes (checked at most every ``interval_s``).

    A file that fails to parse is logged and ignored: the last good policy stays in force.
    """

    def __init__(self, path: Path | None, interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.path = Path(path) if path else None
        self.interval_s = interval_s
        self.clock = clock
        self.policy = RoutingPolicy()
        self._checked = float("-inf")
        self._stamp: tuple | None = None
        self.reloads = 0

    def set(self, policy: RoutingPolicy) -> None:
        """Use ``policy`` until the file changes again (an unchanged file does not override it)."""
        self.policy = policy
        self.reloads += 1
        if self.path is not None:
            self._stamp = _stamp(self.path) or self._stamp
            self._checked = self.clock()

    def current(self) -> RoutingPolicy:
        if self.path is None or self.clock() - self._checked < self.interval_s:
            return self.policy
        self._checked = self.clock()
        stamp = _stamp(self.path)
        if stamp is None:
            return self.policy
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self.policy = parse_policy(self.path.read_text(), str(self.path))
                self.reloads += 1
            except ConfigError as e:
                log.warning("keeping the previous routing policy: %s", e)
        return self.policy


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when the file is replaced or rewritten: the inode (an atomic replace, or a
    ConfigMap's symlink swap, makes a new file even within one mtime tick), mtime and size."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size
