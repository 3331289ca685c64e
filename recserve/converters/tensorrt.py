"""TensorRT engines, built where TensorRT is: its Python API when it imports, else ``trtexec``.

TensorRT is not installable on CPU build machines, so it is imported lazily; there, build with
``--target onnxruntime-trt`` (the engine is then built by onnxruntime's TensorRT provider on the GPU
node at load time) or run the chart's engine-compile Job on a GPU node.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from recserve.converters.triton_config import BuildProfile, TensorSpec
from recserve.errors import ModelError


def profile_shapes(spec: TensorSpec, profile: BuildProfile) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) shapes of one input for the optimization profile: batch 1 .. max_batch_size."""
    rest = tuple(d if d > 0 else 1 for d in spec.dims[1:])
    if any(d <= 0 for d in spec.dims[1:]):
        raise ModelError(f"input '{spec.name}' has a dynamic non-batch axis {spec.dims}; an optimization profile "
                         "here covers the batch axis only: export with fixed feature widths")
    top = max(1, profile.max_batch_size)
    opt = profile.opt_batch_size or max(1, top // 4)
    return (1, *rest), (min(opt, top), *rest), (top, *rest)


def trtexec_command(onnx_path: Path, plan_path: Path, inputs: list[TensorSpec], profile: BuildProfile,
                    timing_cache: Path | None = None) -> list[str]:
    shapes = {s.name: profile_shapes(s, profile) for s in inputs}

    def fmt(i: int) -> str:
        return ",".join(f"{n}:{'x'.join(map(str, v[i]))}" for n, v in shapes.items())

    cmd = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={plan_path}", f"--minShapes={fmt(0)}",
           f"--optShapes={fmt(1)}", f"--maxShapes={fmt(2)}", f"--memPoolSize=workspace:{profile.workspace_mb}M",
           "--skipInference"]
    if profile.precision == "fp16":
        cmd.append("--fp16")
    if profile.precision == "int8":
        cmd += ["--int8", "--fp16"]  # INT8 from the model's QDQ nodes; FP16 where a layer stays float
    if timing_cache is not None:
        cmd.append(f"--timingCacheFile={timing_cache}")
    return cmd


def build_engine(onnx_bytes: bytes, inputs: list[TensorSpec], profile: BuildProfile,
                 timing_cache: Path | None = None) -> bytes:
    """Serialized engine (``model.plan``) for this machine's GPU and TensorRT version."""
    try:
        import tensorrt as trt
    except ImportError:
        if shutil.which("trtexec"):
            return _with_trtexec(onnx_bytes, inputs, profile, timing_cache)
        raise ModelError("TensorRT is not installed on this machine: build with --target onnxruntime-trt (the engine "
                         "is built on the GPU node at load time) or run the engine-compile Job on a GPU node") from None
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"TensorRT cannot parse the model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, profile.workspace_mb << 20)
    if profile.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if profile.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    opt_profile = builder.create_optimization_profile()
    for spec in inputs:
        opt_profile.set_shape(spec.name, *profile_shapes(spec, profile))
    config.add_optimization_profile(opt_profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ModelError("TensorRT failed to build the engine; run `recserve trt-check` on the model for the cause")
    if timing_cache is not None:
        timing_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(engine)


def _with_trtexec(onnx_bytes: bytes, inputs: list[TensorSpec], profile: BuildProfile, timing_cache: Path | None) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        src, plan = Path(tmp) / "model.onnx", Path(tmp) / "model.plan"
        src.write_bytes(onnx_bytes)
        done = subprocess.run(trtexec_command(src, plan, inputs, profile, timing_cache), capture_output=True, text=True)
        if done.returncode != 0 or not plan.exists():
            raise ModelError(f"trtexec failed ({done.returncode}): {done.stdout[-600:]}{done.stderr[-600:]}")
        return plan.read_bytes()
