"""Triton model configuration as ``model_config_pb2.ModelConfig`` messages: pure functions, no I/O.

The build profile (pydantic: what users write in YAML or pass as flags) and the ONNX graph's
inputs and outputs go in; a ModelConfig comes out, serialized with protobuf ``text_format``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import onnx
from google.protobuf import text_format
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tritonclient.grpc import model_config_pb2 as mc

from recserve.errors import ModelError

TARGETS = ("onnxruntime", "tensorrt", "onnxruntime-trt")

_ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: mc.TYPE_FP32, onnx.TensorProto.FLOAT16: mc.TYPE_FP16, onnx.TensorProto.DOUBLE: mc.TYPE_FP64,
    onnx.TensorProto.INT64: mc.TYPE_INT64, onnx.TensorProto.INT32: mc.TYPE_INT32, onnx.TensorProto.INT8: mc.TYPE_INT8,
    onnx.TensorProto.UINT8: mc.TYPE_UINT8, onnx.TensorProto.BOOL: mc.TYPE_BOOL,
}


class BuildProfile(BaseModel):
    """Serving options of one model, from ``--profile YAML`` and/or flags."""

    model_config = ConfigDict(extra="forbid")
    max_batch_size: int = Field(256, ge=0, description="largest batch Triton may form; 0 disables batching")
    dynamic_batching: bool = Field(True, description="let Triton merge concurrent requests into batches")
    preferred_batch_sizes: list[int] = Field(default_factory=list, description="batch sizes the batcher aims for")
    max_queue_delay_us: int = Field(200, ge=0, description="how long a request may wait for a batch to fill")
    instance_count: int = Field(1, ge=1, description="model instances (parallel executions)")
    instance_kind: Literal["auto", "cpu", "gpu"] = Field("auto", description="auto: CPU for onnxruntime, GPU otherwise")
    version_policy: Literal["latest", "all", "specific"] = "latest"
    num_versions: int = Field(1, ge=1, description="with version_policy latest: how many newest versions are served")
    versions: list[int] = Field(default_factory=list, description="with version_policy specific: which versions")
    warmup: bool = Field(True, description="send zero-filled requests at load time")
    warmup_batch_sizes: list[int] = Field(default_factory=lambda: [1])
    response_cache: bool = Field(False, description="cache responses by request content (needs --cache-config)")
    intra_op_threads: int = Field(1, ge=0, description="onnxruntime threads inside one operator")
    inter_op_threads: int = Field(1, ge=0, description="onnxruntime threads across operators")
    precision: Literal["fp32", "fp16", "int8"] = Field("fp16", description="TensorRT precision (int8 needs a QDQ model)")
    opt_batch_size: int | None = Field(None, ge=1, description="TensorRT profile's optimal batch (default: max/4)")
    workspace_mb: int = Field(1024, ge=1, description="TensorRT builder workspace")
    engine_cache_path: str = Field("/tmp/trt-engine-cache", description="onnxruntime-trt: where engines are cached")

    @model_validator(mode="after")
    def _consistent(self) -> BuildProfile:
        if self.version_policy == "specific" and not self.versions:
            raise ValueError("version_policy 'specific' needs 'versions'")
        if any(b > self.max_batch_size for b in self.preferred_batch_sizes) and self.max_batch_size:
            raise ValueError("preferred_batch_sizes must not exceed max_batch_size")
        if any(b > self.max_batch_size for b in self.warmup_batch_sizes) and self.max_batch_size:
            raise ValueError("warmup_batch_sizes must not exceed max_batch_size (Triton refuses to load the model)")
        return self


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: int
    """A ``model_config_pb2.DataType``."""
    dims: tuple[int, ...]
    """Full shape, -1 for dynamic axes (the batch axis included)."""


def graph_io(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs (without initializers) and outputs of a graph, typed for Triton."""
    inits = {t.name for t in model.graph.initializer}

    def spec(v: onnx.ValueInfoProto) -> TensorSpec:
        t = v.type.tensor_type
        if t.elem_type not in _ONNX_TO_TRITON:
            raise ModelError(f"tensor '{v.name}' has ONNX type {t.elem_type}, which Triton configs here do not map")
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        return TensorSpec(v.name, _ONNX_TO_TRITON[t.elem_type], dims)

    return [spec(v) for v in model.graph.input if v.name not in inits], [spec(v) for v in model.graph.output]


def batch_symbols(model: onnx.ModelProto) -> set[str]:
    """The names of the leading axes of every input and output (one name: they share a batch axis)."""
    inits = {t.name for t in model.graph.initializer}
    syms = set()
    for v in list(model.graph.input) + list(model.graph.output):
        if v.name in inits:
            continue
        d = v.type.tensor_type.shape.dim
        syms.add(d[0].dim_param if d and d[0].HasField("dim_param") else (str(d[0].dim_value) if d else ""))
    return syms


def model_config(name: str, model: onnx.ModelProto, target: str, profile: BuildProfile) -> mc.ModelConfig:
    """The config.pbtxt message for ``model`` served under ``name`` on ``target``."""
    if target not in TARGETS:
        raise ModelError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")
    inputs, outputs = graph_io(model)
    batched = profile.max_batch_size > 0 and len(batch_symbols(model)) == 1 and all(
        t.dims and t.dims[0] == -1 for t in inputs + outputs)
    cfg = mc.ModelConfig(name=name, max_batch_size=profile.max_batch_size if batched else 0)
    if target == "tensorrt":
        cfg.platform = "tensorrt_plan"
    else:
        cfg.backend = "onnxruntime"
    for t, field in ((inputs, cfg.input), (outputs, cfg.output)):
        for spec in t:
            dims = spec.dims[1:] if batched else spec.dims
            field.add(name=spec.name, data_type=spec.data_type, dims=list(dims))
    if batched and profile.dynamic_batching:
        cfg.dynamic_batching.preferred_batch_size.extend(profile.preferred_batch_sizes)
        cfg.dynamic_batching.max_queue_delay_microseconds = profile.max_queue_delay_us
    kind = profile.instance_kind
    if kind == "auto":
        kind = "cpu" if target == "onnxruntime" else "gpu"
    cfg.instance_group.add(count=profile.instance_count,
                           kind=mc.ModelInstanceGroup.KIND_CPU if kind == "cpu" else mc.ModelInstanceGroup.KIND_GPU)
    if profile.version_policy == "latest":
        cfg.version_policy.latest.num_versions = profile.num_versions
    elif profile.version_policy == "all":
        cfg.version_policy.all.SetInParent()
    else:
        cfg.version_policy.specific.versions.extend(profile.versions)
    if profile.warmup:
        for b in profile.warmup_batch_sizes if batched else [1]:
            w = cfg.model_warmup.add(name=f"zeros_batch_{b}", batch_size=b if batched else 1)
            for spec in inputs:
                dims = [d if d > 0 else 1 for d in (spec.dims[1:] if batched else spec.dims)]
                w.inputs[spec.name].CopyFrom(mc.ModelWarmup.Input(data_type=spec.data_type, dims=dims, zero_data=True))
    if profile.response_cache:
        cfg.response_cache.enable = True
    if target != "tensorrt":
        cfg.parameters["intra_op_thread_count"].string_value = str(profile.intra_op_threads)
        cfg.parameters["inter_op_thread_count"].string_value = str(profile.inter_op_threads)
    if target == "onnxruntime-trt":
        acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        acc.parameters["precision_mode"] = profile.precision.upper() if profile.precision != "fp32" else "FP32"
        acc.parameters["max_workspace_size_bytes"] = str(profile.workspace_mb << 20)
        acc.parameters["trt_engine_cache_enable"] = "1"
        acc.parameters["trt_engine_cache_path"] = profile.engine_cache_path
    return cfg


def to_pbtxt(cfg: mc.ModelConfig) -> str:
    return text_format.MessageToString(cfg)


def from_pbtxt(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())
