"""Load-test scenarios (YAML, pydantic): what to call, how requests arrive, what they carry."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from recserve.specs import read_mapping, read_text, validate


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Burst(_Spec):
    """For ``duration_s`` from ``at_s``, arrivals come ``multiplier`` times faster."""

    at_s: float = Field(ge=0)
    duration_s: float = Field(gt=0)
    multiplier: float = Field(gt=0)


class Arrivals(_Spec):
    process: Literal["constant", "poisson"] = "poisson"
    rate: float = Field(100.0, gt=0, description="requests per second (open loop)")
    duration_s: float = Field(10.0, gt=0)
    warmup_s: float = Field(2.0, ge=0, description="sent but not recorded")
    bursts: list[Burst] = Field(default_factory=list)


class Requests(_Spec):
    """What each request carries."""

    candidates_min: int = Field(20, ge=1)
    candidates_max: int = Field(100, ge=1)
    zipf_exponent: float = Field(1.1, gt=1.0, description="item popularity: rank r is drawn with weight r^-s")
    users: int = Field(1000, ge=1)
    top_k: int = Field(10, ge=0)
    pool: int = Field(256, ge=1, description="distinct requests built ahead and cycled through")

    @model_validator(mode="after")
    def _sizes(self) -> Requests:
        if self.candidates_max < self.candidates_min:
            raise ValueError("candidates_max must be >= candidates_min")
        return self


class Scenario(_Spec):
    name: str = "scenario"
    target: Literal["triton", "router", "trivial"] = "triton"
    url: str | list[str] = Field("127.0.0.1:8001", description="gRPC address of the target, or a list of ip:port "
                                 "addresses called round robin (a direct-ingress router's replicas)")
    model: str = Field("ranker", description="Triton model, or the router's model")
    catalog: Path | None = Field(None, description="item catalog (`recserve catalog`) for realistic candidates")
    preprocessing: Path | None = Field(None, description="the ranker's preprocessing.json (Triton target)")
    mode: Literal["open", "closed"] = "open"
    concurrency: int = Field(16, ge=1, description="closed loop: requests in flight")
    arrivals: Arrivals = Field(default_factory=Arrivals)
    requests: Requests = Field(default_factory=Requests)
    timeout_ms: float = Field(1000.0, gt=0, description="per-request deadline (also the router's budget)")
    workers: int = Field(1, ge=1, description="generator processes (use more when one cannot keep the schedule)")
    max_lag_p99_ms: float = Field(1.0, gt=0, description="a run whose p99 scheduling lag exceeds this is invalid")
    rate_tolerance: float = Field(0.1, gt=0, lt=1, description="an open-loop run whose successful requests/s fall "
                                  "short of the rate by more than this share is invalid (it did not load the target)")
    slo_p99_ms: float = Field(10.0, gt=0, description="latency objective for rate sweeps")
    seed: int = 0

    @field_validator("url")
    @classmethod
    def _addresses(cls, url: str | list[str]) -> str | list[str]:
        from recserve.serving.client import channel_args

        channel_args(url)  # a list must be IPv4 ip:port entries
        return url

    @model_validator(mode="after")
    def _needs(self) -> Scenario:
        if self.target == "triton" and (self.catalog is None) != (self.preprocessing is None):
            raise ValueError("target triton: give both catalog and preprocessing, or neither (synthetic ids)")
        return self


def load_scenario(path: Path) -> Scenario:
    source = str(path)
    scenario = validate(Scenario, read_mapping(read_text(path, "scenario"), source, "a scenario is a YAML mapping"),
                        source)
    base = Path(path).resolve().parent
    for field in ("catalog", "preprocessing"):
        p = getattr(scenario, field)
        if p is not None and not p.is_absolute():
            setattr(scenario, field, (base / p).resolve())
    return scenario
