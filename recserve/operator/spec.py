"""The ``ModelRollout`` custom resource (``recserve.io/v1alpha1``) as pydantic models.

The CRD's OpenAPI schema is generated from these models (``recserve.operator.crd``), so the API
server rejects what the operator would reject, where a schema can say it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from recserve.serving.policy import target_key

GROUP, VERSION, PLURAL, KIND = "recserve.io", "v1alpha1", "modelrollouts", "ModelRollout"


class _Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Step(_Camel):
    """One canary step: send ``weight`` percent of traffic to the candidate, then wait ``pause_seconds``."""

    weight: int = Field(ge=1, le=100, description="percent of traffic on the candidate during this step")
    pause_seconds: float = Field(60.0, ge=0, description="how long the step lasts (analysis runs meanwhile)")


class Thresholds(_Camel):
    """Limits one analysis of the candidate must meet."""

    max_error_rate: float = Field(0.01, ge=0, le=1, description="failed / all candidate requests in the interval")
    max_p99_latency_ms: float | None = Field(None, gt=0, description="Triton's p99 request latency of the candidate")
    min_shadow_agreement: float | None = Field(None, ge=0, le=1, description="router's mean overlap@k with stable")


class Analysis(_Camel):
    interval_seconds: float = Field(30.0, gt=0, description="time between analyses")
    failure_limit: int = Field(2, ge=1, description="failed analyses that roll the candidate back")
    min_requests: int = Field(20, ge=0, description="candidate requests an analysis needs to judge (fewer: "
                              "inconclusive, and the requests carry over to the next analysis)")
    max_inconclusive: int | None = Field(None, ge=1, description="inconclusive analyses in a row (too few requests, "
                                         "or no metrics) after which the rollout goes back to the stable version; "
                                         "null: wait for enough traffic however long it takes")
    thresholds: Thresholds = Field(default_factory=Thresholds)


class TritonEndpoint(_Camel):
    """Where Triton is: one server (``grpcUrl`` and ``metricsUrl``), or every pod behind a Service (``service``)."""

    service: str | None = Field(None, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63,
                                description="a Service in the rollout's namespace (the chart's Triton Service): its "
                                "EndpointSlices list the Triton pods, and every ready pod gets the model control "
                                "(the versions loaded, again after the pod restarts) and has its metrics read. "
                                "Its ports are the ones named `grpc` and `metrics`")
    grpc_url: str | None = Field(None, description="one Triton's gRPC address, e.g. triton.recserve:8001 (without "
                                 "`service`)")
    metrics_url: str | None = Field(None, description="its metrics, e.g. http://triton.recserve:8002/metrics")
    model_repository: str | None = Field(None, description="Triton's model repository as the operator sees it (the "
                                         "chart's operator.mountModelRepository mounts it at /models): the canary "
                                         "starts only if the candidate version was built from the model the "
                                         "compressionReport names (its sha256)")

    @model_validator(mode="after")
    def _where(self) -> TritonEndpoint:
        if self.service is None and not (self.grpc_url and self.metrics_url):
            raise ValueError("triton needs service (every pod behind it), or grpcUrl and metricsUrl (one server)")
        return self


class RouterTarget(_Camel):
    """Where the routing policy goes and where the router's metrics are."""

    config_map: str | None = Field(None, description="ConfigMap (in the rollout's namespace) the router mounts")
    policy_file: str | None = Field(None, description="or a policy file the router reads (local runs)")
    metrics_url: str | None = Field(None, description="router /metrics, for shadow agreement")
    shadow_percent: float = Field(0.0, ge=0, le=100, description="share of cloud traffic mirrored to the candidate")
    drain_seconds: float = Field(10.0, ge=0, description="how long routers get to pick up a final policy before the "
                                 "version it no longer uses is unloaded (a mounted ConfigMap can take a minute)")

    @model_validator(mode="after")
    def _target(self) -> RouterTarget:
        if not self.config_map and not self.policy_file:
            raise ValueError("router needs configMap or policyFile: where the routing policy is written")
        return self


class ModelRolloutSpec(_Camel):
    model: str = Field(min_length=1, description="Triton model name")
    stable_version: str = Field(pattern=r"^[1-9][0-9]{0,17}$", description="a Triton version number, as Triton "
                                "names its version directories (no leading zeros)")
    candidate_version: str = Field(pattern=r"^[1-9][0-9]{0,17}$")
    candidate_model: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="the Triton model "
                                        "of the candidate version when it is not `model`: Triton serves every version "
                                        "of a model with one platform, so a TensorRT build of an ONNX model is its "
                                        "own model (`ranker_trt`); the router splits `model`'s traffic with it")
    steps: list[Step] = Field(min_length=1, max_length=20)
    analysis: Analysis = Field(default_factory=Analysis)
    triton: TritonEndpoint
    router: RouterTarget
    compression_report: dict[str, Any] | None = Field(
        None, description="the candidate's `recserve compress` report (its gate must have passed)")
    load_timeout_seconds: float = Field(120.0, gt=0, description="how long Triton may take to load both versions "
                                        "before the rollout ends on the stable version")
    paused: bool = Field(False, description="hold the current step (analysis goes on)")
    abort: bool = Field(False, description="roll back to the stable version now")

    @property
    def candidate_model_name(self) -> str:
        """The Triton model the candidate version is a version of."""
        return self.candidate_model or self.model

    @property
    def candidate_key(self) -> str:
        """The candidate as the routing policy names it among ``model``'s versions: ``"2"``, or ``"ranker_trt:1"``
        for a version of another model (``recserve.serving.policy.split_target``)."""
        return target_key(self.model, self.candidate_model_name, self.candidate_version)

    @model_validator(mode="after")
    def _versions(self) -> ModelRolloutSpec:
        if self.stable_version == self.candidate_version and self.candidate_model_name == self.model:
            raise ValueError("candidateVersion must differ from stableVersion (or name another candidateModel)")
        weights = [s.weight for s in self.steps]
        if weights != sorted(weights):
            raise ValueError("step weights must not decrease")
        return self
