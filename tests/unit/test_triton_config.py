"""Triton model configs, the model repository, build profiles, TensorRT commands and the TensorRT readiness check.

All on graphs exported from tiny untrained reference models (or built by hand): no server, no training.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError
from tritonclient.grpc import model_config_pb2 as mc

from recserve.converters.build import build, load_profile
from recserve.converters.repository import add_version, versions
from recserve.converters.tensorrt import profile_shapes, trtexec_command
from recserve.converters.triton_config import BuildProfile, TensorSpec, from_pbtxt, graph_io, model_config, to_pbtxt
from recserve.converters.trt_check import check
from recserve.errors import ConfigError, ModelError
from recserve.provenance import source_sha256

CARDINALITIES = [11, 21, 7, 5, 9, 4]


@pytest.fixture(scope="module")
def ranker_graph() -> onnx.ModelProto:
    from recserve.models.artifact import build_module
    from recserve.models.export import export_onnx
    from recserve.models.ranker import RankerConfig

    module = build_module("ranker", RankerConfig(CARDINALITIES, 3, embedding_dim=4, cross_layers=1, bottom_mlp=[8],
                                                 top_mlp=[8]))
    rng = np.random.default_rng(0)
    sample = {"sparse": rng.integers(0, 4, (5, 6)).astype(np.int64), "dense": rng.normal(size=(5, 3)).astype(np.float32)}
    return export_onnx(module, "ranker", sample)


@pytest.fixture(scope="module")
def two_tower_graph() -> onnx.ModelProto:
    from recserve.models.artifact import build_module
    from recserve.models.export import export_onnx
    from recserve.models.two_tower import TwoTowerConfig

    module = build_module("two-tower", TwoTowerConfig([13], [17, 5, 6, 4], embedding_dim=4, tower_mlp=[8], output_dim=6))
    sample = {"user_sparse": np.arange(4, dtype=np.int64).reshape(4, 1),
              "item_sparse": np.ones((5, 4), dtype=np.int64)}
    return export_onnx(module, "two-tower", sample)


def _io(fields) -> list[tuple[str, int, list[int]]]:
    return [(t.name, t.data_type, list(t.dims)) for t in fields]


# --- model_config ---------------------------------------------------------------------------------------------------


def test_ranker_config_batches_without_the_batch_axis(ranker_graph) -> None:
    profile = BuildProfile(max_batch_size=64, preferred_batch_sizes=[16, 32], max_queue_delay_us=750)
    cfg = model_config("rk", ranker_graph, "onnxruntime", profile)
    assert cfg.name == "rk" and cfg.backend == "onnxruntime" and cfg.platform == ""
    assert cfg.max_batch_size == 64
    assert _io(cfg.input) == [("sparse", mc.TYPE_INT64, [6]), ("dense", mc.TYPE_FP32, [3])]
    assert _io(cfg.output) == [("score", mc.TYPE_FP32, [1])]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [16, 32]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 750
    assert len(cfg.instance_group) == 1
    assert cfg.instance_group[0].count == 1 and cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert cfg.version_policy.WhichOneof("policy_choice") == "latest"
    assert cfg.version_policy.latest.num_versions == 1
    assert not cfg.response_cache.enable
    assert not cfg.HasField("optimization")


def test_dynamic_batching_off_leaves_no_batcher(ranker_graph) -> None:
    cfg = model_config("rk", ranker_graph, "onnxruntime", BuildProfile(dynamic_batching=False))
    assert cfg.max_batch_size == 256
    assert not cfg.HasField("dynamic_batching")


def test_max_batch_size_zero_gives_full_dims_and_no_batcher(ranker_graph) -> None:
    cfg = model_config("rk", ranker_graph, "onnxruntime", BuildProfile(max_batch_size=0))
    assert cfg.max_batch_size == 0
    assert _io(cfg.input) == [("sparse", mc.TYPE_INT64, [-1, 6]), ("dense", mc.TYPE_FP32, [-1, 3])]
    assert _io(cfg.output) == [("score", mc.TYPE_FP32, [-1, 1])]
    assert not cfg.HasField("dynamic_batching")
    (w,) = cfg.model_warmup
    assert w.batch_size == 1 and list(w.inputs["sparse"].dims) == [1, 6]


def test_two_tower_graph_has_two_batch_axes_so_it_does_not_batch(two_tower_graph) -> None:
    cfg = model_config("tt", two_tower_graph, "onnxruntime", BuildProfile(max_batch_size=128))
    assert cfg.max_batch_size == 0
    assert _io(cfg.input) == [("user_sparse", mc.TYPE_INT64, [-1, 1]), ("item_sparse", mc.TYPE_INT64, [-1, 4])]
    _, outputs = graph_io(two_tower_graph)  # the full shapes, batch axis included
    assert _io(cfg.output) == [(o.name, mc.TYPE_FP32, list(o.dims)) for o in outputs]
    assert [o.name for o in outputs] == ["user_embedding", "item_embedding"]
    assert all(len(o.dims) == 2 and o.dims[0] == -1 for o in outputs)
    assert not cfg.HasField("dynamic_batching")
    (w,) = cfg.model_warmup  # one warmup, batch 1, every dynamic axis as 1
    assert w.batch_size == 1
    assert list(w.inputs["user_sparse"].dims) == [1, 1] and list(w.inputs["item_sparse"].dims) == [1, 4]


@pytest.mark.parametrize("target, kind, want", [
    ("onnxruntime", "auto", mc.ModelInstanceGroup.KIND_CPU),
    ("tensorrt", "auto", mc.ModelInstanceGroup.KIND_GPU),
    ("onnxruntime-trt", "auto", mc.ModelInstanceGroup.KIND_GPU),
    ("onnxruntime", "gpu", mc.ModelInstanceGroup.KIND_GPU),
    ("tensorrt", "cpu", mc.ModelInstanceGroup.KIND_CPU),
])
def test_instance_group_kind(ranker_graph, target: str, kind: str, want: int) -> None:
    cfg = model_config("rk", ranker_graph, target, BuildProfile(instance_kind=kind, instance_count=3))
    (group,) = cfg.instance_group
    assert group.kind == want and group.count == 3


def test_version_policies(ranker_graph) -> None:
    latest = model_config("rk", ranker_graph, "onnxruntime", BuildProfile(num_versions=2)).version_policy
    assert latest.WhichOneof("policy_choice") == "latest" and latest.latest.num_versions == 2
    every = model_config("rk", ranker_graph, "onnxruntime", BuildProfile(version_policy="all")).version_policy
    assert every.WhichOneof("policy_choice") == "all"
    specific = model_config("rk", ranker_graph, "onnxruntime",
                            BuildProfile(version_policy="specific", versions=[1, 3])).version_policy
    assert specific.WhichOneof("policy_choice") == "specific" and list(specific.specific.versions) == [1, 3]


def test_warmup_sends_zeros_of_each_input_type(ranker_graph) -> None:
    cfg = model_config("rk", ranker_graph, "onnxruntime", BuildProfile(warmup_batch_sizes=[1, 8]))
    assert [(w.name, w.batch_size) for w in cfg.model_warmup] == [("zeros_batch_1", 1), ("zeros_batch_8", 8)]
    for w in cfg.model_warmup:
        assert set(w.inputs) == {"sparse", "dense"}
        assert (w.inputs["sparse"].data_type, list(w.inputs["sparse"].dims)) == (mc.TYPE_INT64, [6])
        assert (w.inputs["dense"].data_type, list(w.inputs["dense"].dims)) == (mc.TYPE_FP32, [3])
        assert all(i.zero_data for i in w.inputs.values())
    assert not model_config("rk", ranker_graph, "onnxruntime", BuildProfile(warmup=False)).model_warmup


def test_response_cache_and_thread_parameters(ranker_graph) -> None:
    cfg = model_config("rk", ranker_graph, "onnxruntime",
                       BuildProfile(response_cache=True, intra_op_threads=4, inter_op_threads=2))
    assert cfg.response_cache.enable
    assert cfg.parameters["intra_op_thread_count"].string_value == "4"
    assert cfg.parameters["inter_op_thread_count"].string_value == "2"


def test_tensorrt_target_is_a_tensorrt_plan_without_onnxruntime_parameters(ranker_graph) -> None:
    cfg = model_config("rk", ranker_graph, "tensorrt", BuildProfile())
    assert cfg.platform == "tensorrt_plan" and cfg.backend == ""
    assert cfg.max_batch_size == 256 and _io(cfg.input)[0] == ("sparse", mc.TYPE_INT64, [6])
    assert "intra_op_thread_count" not in cfg.parameters and "inter_op_thread_count" not in cfg.parameters
    assert not cfg.HasField("optimization")


@pytest.mark.parametrize("precision, mode", [("fp16", "FP16"), ("fp32", "FP32"), ("int8", "INT8")])
def test_onnxruntime_trt_adds_the_tensorrt_accelerator(ranker_graph, precision: str, mode: str) -> None:
    profile = BuildProfile(precision=precision, workspace_mb=512, engine_cache_path="/cache/trt")
    cfg = model_config("rk", ranker_graph, "onnxruntime-trt", profile)
    assert cfg.backend == "onnxruntime" and cfg.platform == ""
    (acc,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt"
    assert dict(acc.parameters) == {"precision_mode": mode, "max_workspace_size_bytes": str(512 * 1024 * 1024),
                                    "trt_engine_cache_enable": "1", "trt_engine_cache_path": "/cache/trt"}
    assert cfg.parameters["intra_op_thread_count"].string_value == "1"
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU


def test_unknown_target_is_a_model_error(ranker_graph) -> None:
    with pytest.raises(ModelError, match="unknown target"):
        model_config("rk", ranker_graph, "tflite", BuildProfile())


def test_graph_io_types_and_dims(ranker_graph) -> None:
    inputs, outputs = graph_io(ranker_graph)
    assert inputs == [TensorSpec("sparse", mc.TYPE_INT64, (-1, 6)), TensorSpec("dense", mc.TYPE_FP32, (-1, 3))]
    assert outputs == [TensorSpec("score", mc.TYPE_FP32, (-1, 1))]


def test_graph_io_refuses_types_triton_configs_do_not_map() -> None:
    text = helper.make_tensor_value_info("query", TensorProto.STRING, ["batch", 1])
    y = helper.make_tensor_value_info("y", TensorProto.STRING, ["batch", 1])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["query"], ["y"])], "g", [text], [y]))
    with pytest.raises(ModelError, match="'query'"):
        graph_io(model)


# --- pbtxt ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target, profile", [
    ("onnxruntime", BuildProfile(preferred_batch_sizes=[8, 64], response_cache=True, warmup_batch_sizes=[1, 4])),
    ("onnxruntime-trt", BuildProfile(version_policy="specific", versions=[2, 5])),
    ("tensorrt", BuildProfile(version_policy="all", instance_count=2)),
])
def test_pbtxt_round_trip(ranker_graph, target: str, profile: BuildProfile) -> None:
    cfg = model_config("rk", ranker_graph, target, profile)
    text = to_pbtxt(cfg)
    assert 'name: "rk"' in text
    assert from_pbtxt(text) == cfg
    assert to_pbtxt(from_pbtxt(text)) == text


def test_pbtxt_round_trip_two_tower(two_tower_graph) -> None:
    cfg = model_config("tt", two_tower_graph, "onnxruntime", BuildProfile())
    assert from_pbtxt(to_pbtxt(cfg)) == cfg


# --- BuildProfile and load_profile ----------------------------------------------------------------------------------


def test_profile_specific_policy_needs_versions() -> None:
    with pytest.raises(ValidationError, match="needs 'versions'"):
        BuildProfile(version_policy="specific")


def test_profile_preferred_batch_sizes_must_fit_max_batch_size() -> None:
    with pytest.raises(ValidationError, match="must not exceed max_batch_size"):
        BuildProfile(max_batch_size=32, preferred_batch_sizes=[16, 64])
    assert BuildProfile(max_batch_size=32, preferred_batch_sizes=[16, 32]).preferred_batch_sizes == [16, 32]


@pytest.mark.parametrize("bad", [{"max_batch_size": -1}, {"instance_count": 0}, {"instance_kind": "tpu"},
                                 {"precision": "int4"}, {"no_such_option": 1}])
def test_profile_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValidationError):
        BuildProfile(**bad)


def test_profile_warmup_batch_sizes_must_fit_max_batch_size() -> None:
    try:
        BuildProfile(max_batch_size=8, warmup_batch_sizes=[16])
        accepted = True
    except ValidationError as e:
        accepted = False
        assert "warmup_batch_sizes" in str(e)
    assert not accepted, "a warmup batch of 16 with max_batch_size 8 was accepted"


def test_load_profile_yaml_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "profile.yaml"
    path.write_text("max_batch_size: 32\npreferred_batch_sizes: [8, 16]\nversion_policy: specific\nversions: [2]\n"
                    "instance_count: 2\n")
    profile = load_profile(path, {"max_batch_size": 64, "instance_count": None, "precision": "int8"})
    assert profile.max_batch_size == 64  # flag wins
    assert profile.instance_count == 2  # a flag given as None leaves the YAML value
    assert profile.preferred_batch_sizes == [8, 16] and profile.versions == [2] and profile.precision == "int8"
    assert load_profile(None, {"max_batch_size": None}) == BuildProfile()


@pytest.mark.parametrize("text, needle", [
    ("max_batch_size: [1, 2\n", "not valid YAML"),
    ("- 1\n- 2\n", "mapping"),
    ("max_batch_size: lots\n", "max_batch_size"),
    ("no_such_option: 1\n", "no_such_option"),
    ("max_batch_size: 8\npreferred_batch_sizes: [16]\n", "preferred_batch_sizes"),
])
def test_load_profile_errors_are_config_errors(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "profile.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_profile(path, {})


def test_load_profile_missing_file_and_bad_override(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read profile"):
        load_profile(tmp_path / "missing.yaml", {})
    with pytest.raises(ConfigError, match="build profile"):
        load_profile(None, {"max_batch_size": 4, "preferred_batch_sizes": [8]})


# --- add_version ----------------------------------------------------------------------------------------------------


def _files(tag: bytes) -> dict[str, bytes]:
    return {"model.onnx": b"onnx-" + tag, "preprocessing.json": b"{}"}


def test_add_version_numbers_versions_and_writes_the_config(tmp_path: Path, ranker_graph) -> None:
    cfg = model_config("ranker", ranker_graph, "onnxruntime", BuildProfile())
    assert add_version(tmp_path, cfg, _files(b"1")) == tmp_path / "ranker" / "1"
    assert add_version(tmp_path, cfg, _files(b"2")) == tmp_path / "ranker" / "2"
    assert add_version(tmp_path, cfg, _files(b"5"), version=5) == tmp_path / "ranker" / "5"
    assert add_version(tmp_path, cfg, _files(b"6")) == tmp_path / "ranker" / "6"
    assert versions(tmp_path / "ranker") == [1, 2, 5, 6]
    assert (tmp_path / "ranker" / "2" / "model.onnx").read_bytes() == b"onnx-2"
    assert (tmp_path / "ranker" / "5" / "preprocessing.json").read_bytes() == b"{}"
    assert from_pbtxt((tmp_path / "ranker" / "config.pbtxt").read_text()) == cfg


def test_add_version_never_overwrites_an_existing_version(tmp_path: Path, ranker_graph) -> None:
    cfg = model_config("ranker", ranker_graph, "onnxruntime", BuildProfile())
    add_version(tmp_path, cfg, _files(b"first"))
    config_before = (tmp_path / "ranker" / "config.pbtxt").read_bytes()
    other = model_config("ranker", ranker_graph, "onnxruntime", BuildProfile(instance_count=4))
    with pytest.raises(ConfigError, match="never overwritten"):
        add_version(tmp_path, other, _files(b"second"), version=1)
    assert (tmp_path / "ranker" / "1" / "model.onnx").read_bytes() == b"onnx-first"
    assert sorted(p.name for p in (tmp_path / "ranker" / "1").iterdir()) == ["model.onnx", "preprocessing.json"]
    assert (tmp_path / "ranker" / "config.pbtxt").read_bytes() == config_before
    with pytest.raises(ConfigError):
        add_version(tmp_path, cfg, _files(b"zero"), version=0)
    assert versions(tmp_path / "ranker") == [1]


@pytest.mark.parametrize("change", ["max_batch_size", "two_tower", "input_dims"])
def test_add_version_refuses_a_changed_signature(tmp_path: Path, ranker_graph, two_tower_graph, change: str) -> None:
    cfg = model_config("ranker", ranker_graph, "onnxruntime", BuildProfile())
    add_version(tmp_path, cfg, _files(b"1"))
    config_before = (tmp_path / "ranker" / "config.pbtxt").read_bytes()
    if change == "max_batch_size":
        new = model_config("ranker", ranker_graph, "onnxruntime", BuildProfile(max_batch_size=64))
    elif change == "two_tower":
        new = model_config("ranker", two_tower_graph, "onnxruntime", BuildProfile())
    else:
        new = model_config("ranker", ranker_graph, "onnxruntime", BuildProfile())
        new.input[1].dims[0] = 4
    with pytest.raises(ConfigError, match="differ"):
        add_version(tmp_path, new, _files(b"2"))
    assert versions(tmp_path / "ranker") == [1]
    assert (tmp_path / "ranker" / "config.pbtxt").read_bytes() == config_before


@pytest.mark.parametrize(("first", "then"), [("onnxruntime", "tensorrt"), ("tensorrt", "onnxruntime")])
def test_add_version_refuses_another_platform(tmp_path: Path, ranker_graph, first: str, then: str) -> None:
    """Triton's platform is per model: a TensorRT version added to an ONNX model rewrote the shared config to
    tensorrt_plan and its ONNX versions could no longer load. Refused, the repository untouched."""
    add_version(tmp_path, model_config("ranker", ranker_graph, first, BuildProfile()), _files(b"1"))
    config_before = (tmp_path / "ranker" / "config.pbtxt").read_bytes()
    with pytest.raises(ConfigError, match="one platform") as info:
        add_version(tmp_path, model_config("ranker", ranker_graph, then, BuildProfile()), _files(b"2"))
    assert "another --name (e.g. ranker_trt)" in str(info.value) and "\n" not in str(info.value)
    assert versions(tmp_path / "ranker") == [1]
    assert (tmp_path / "ranker" / "config.pbtxt").read_bytes() == config_before


def test_add_version_keeps_the_signature_but_takes_new_serving_options(tmp_path: Path, ranker_graph) -> None:
    add_version(tmp_path, model_config("ranker", ranker_graph, "onnxruntime", BuildProfile()), _files(b"1"))
    new = model_config("ranker", ranker_graph, "onnxruntime", BuildProfile(instance_count=3, max_queue_delay_us=900))
    add_version(tmp_path, new, _files(b"2"))
    assert from_pbtxt((tmp_path / "ranker" / "config.pbtxt").read_text()) == new


@pytest.mark.parametrize("name", ["../evil", "a/b", "", "-dash", "with space", ".hidden"])
def test_add_version_refuses_bad_names(tmp_path: Path, ranker_graph, name: str) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    cfg = model_config(name, ranker_graph, "onnxruntime", BuildProfile())
    with pytest.raises(ConfigError, match="model name"):
        add_version(repo, cfg, _files(b"x"))
    assert list(tmp_path.rglob("*")) == [repo]


# --- TensorRT: profile shapes, trtexec, build without TensorRT -----------------------------------------------------


def test_profile_shapes_cover_batch_one_to_max() -> None:
    spec = TensorSpec("x", mc.TYPE_FP32, (-1, 5))
    assert profile_shapes(spec, BuildProfile()) == ((1, 5), (64, 5), (256, 5))
    assert profile_shapes(spec, BuildProfile(max_batch_size=32, opt_batch_size=8)) == ((1, 5), (8, 5), (32, 5))
    assert profile_shapes(spec, BuildProfile(max_batch_size=32, opt_batch_size=100)) == ((1, 5), (32, 5), (32, 5))
    assert profile_shapes(spec, BuildProfile(max_batch_size=2)) == ((1, 5), (1, 5), (2, 5))
    assert profile_shapes(spec, BuildProfile(max_batch_size=0)) == ((1, 5), (1, 5), (1, 5))


def test_profile_shapes_refuse_a_dynamic_feature_axis() -> None:
    with pytest.raises(ModelError, match="dynamic non-batch axis"):
        profile_shapes(TensorSpec("x", mc.TYPE_FP32, (-1, -1)), BuildProfile())


@pytest.mark.parametrize("precision, flags, absent", [
    ("fp16", ["--fp16"], ["--int8"]),
    ("int8", ["--int8", "--fp16"], []),
    ("fp32", [], ["--fp16", "--int8"]),
])
def test_trtexec_command(ranker_graph, tmp_path: Path, precision: str, flags: list[str], absent: list[str]) -> None:
    inputs, _ = graph_io(ranker_graph)
    profile = BuildProfile(max_batch_size=64, precision=precision, workspace_mb=256)
    cmd = trtexec_command(tmp_path / "m.onnx", tmp_path / "m.plan", inputs, profile, timing_cache=tmp_path / "t.cache")
    assert cmd[0] == "trtexec"
    assert f"--onnx={tmp_path / 'm.onnx'}" in cmd and f"--saveEngine={tmp_path / 'm.plan'}" in cmd
    assert "--minShapes=sparse:1x6,dense:1x3" in cmd
    assert "--optShapes=sparse:16x6,dense:16x3" in cmd
    assert "--maxShapes=sparse:64x6,dense:64x3" in cmd
    assert "--memPoolSize=workspace:256M" in cmd
    assert f"--timingCacheFile={tmp_path / 't.cache'}" in cmd
    for f in flags:
        assert f in cmd
    for f in absent:
        assert f not in cmd
    assert not any(c.startswith("--timingCacheFile") for c in trtexec_command(
        tmp_path / "m.onnx", tmp_path / "m.plan", inputs, profile))


@pytest.fixture
def ranker_onnx(tmp_path: Path, ranker_graph) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(ranker_graph, path)
    return path


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_build_for_tensorrt_without_tensorrt_points_to_onnxruntime_trt(ranker_onnx: Path, tmp_path: Path,
                                                                        monkeypatch) -> None:
    import recserve.converters.tensorrt as trt_mod

    monkeypatch.setattr(trt_mod.shutil, "which", lambda name: None)  # no trtexec either
    repo = tmp_path / "repo"
    with pytest.raises(ModelError, match="onnxruntime-trt"):
        build(ranker_onnx, "ranker", "tensorrt", repo, BuildProfile())
    assert not (repo / "ranker").exists()


def test_build_for_onnxruntime_trt_writes_the_onnx_model(ranker_onnx: Path, tmp_path: Path) -> None:
    result = build(ranker_onnx, "ranker", "onnxruntime-trt", tmp_path / "repo", BuildProfile(precision="fp16"))
    assert result.version_dir == tmp_path / "repo" / "ranker" / "1"
    assert (result.version_dir / "model.onnx").read_bytes() == ranker_onnx.read_bytes()
    assert source_sha256(result.version_dir) == hashlib.sha256(ranker_onnx.read_bytes()).hexdigest()
    assert not [f for f in result.findings if f.severity == "error"]
    cfg = from_pbtxt((tmp_path / "repo" / "ranker" / "config.pbtxt").read_text())
    assert cfg.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters["precision_mode"] == "FP16"
    assert to_pbtxt(cfg) == result.config_text


def test_build_with_an_unknown_target_is_a_config_error(ranker_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown --target"):
        build(ranker_onnx, "ranker", "openvino", tmp_path / "repo", BuildProfile())
    assert not (tmp_path / "repo").exists()


@pytest.mark.gpu
def test_build_a_real_tensorrt_engine(ranker_onnx: Path, tmp_path: Path) -> None:
    import tensorrt as trt

    result = build(ranker_onnx, "ranker", "tensorrt", tmp_path / "repo", BuildProfile(max_batch_size=16, precision="fp16"))
    plan = (result.version_dir / "model.plan").read_bytes()
    assert plan and not (result.version_dir / "model.onnx").exists()
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
    assert engine is not None
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    assert names == {"sparse", "dense", "score"}
    assert tuple(engine.get_tensor_profile_shape("dense", 0)[2]) == (16, 3)
    assert from_pbtxt(result.config_text).platform == "tensorrt_plan"


# --- trt_check ------------------------------------------------------------------------------------------------------


def _graph(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _errors(model: onnx.ModelProto, max_batch_size: int = 256) -> list:
    return [f for f in check(model, max_batch_size) if f.severity == "error"]


X = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])


def test_trt_check_passes_a_plain_float_ranker(ranker_graph) -> None:
    assert _errors(ranker_graph) == []


def test_trt_check_passes_a_plain_graph() -> None:
    assert check(_graph([helper.make_node("Relu", ["x"], ["y"])], [X], [Y])) == []


def test_trt_check_flags_unsupported_and_custom_operators() -> None:
    model = _graph([helper.make_node("Unique", ["x"], ["y"], name="uniq")], [X], [Y])
    (f,) = _errors(model)
    assert f.node == "uniq" and "Unique" in f.message
    custom = _graph([helper.make_node("FusedGelu", ["x"], ["y"], name="gelu", domain="com.microsoft")], [X], [Y])
    (f,) = _errors(custom)
    assert "com.microsoft" in f.message and "plugin" in f.message


def _qdq(zero_point: np.ndarray) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "scale"), numpy_helper.from_array(zero_point, "zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], name="quant"),
             helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], name="dequant")]
    return _graph(nodes, [X], [Y], inits)


def test_trt_check_accepts_symmetric_int8_qdq() -> None:
    assert _errors(_qdq(np.array(0, np.int8))) == []


def test_trt_check_flags_a_non_zero_zero_point() -> None:
    found = _errors(_qdq(np.array(3, np.int8)))
    assert {f.node for f in found} == {"quant", "dequant"}
    assert all("non-zero zero point" in f.message for f in found)


def test_trt_check_flags_a_uint8_zero_point() -> None:
    found = _errors(_qdq(np.array(0, np.uint8)))
    qdq = [f for f in found if f.node in ("quant", "dequant")]
    assert {f.node for f in qdq} == {"quant", "dequant"}
    assert all("UINT8 zero point" in f.message for f in qdq)
    assert {f.node for f in found} - {"quant", "dequant"} <= {"zp"}  # the UINT8 initializer itself, at most


def test_trt_check_flags_int64_initializers_outside_int32() -> None:
    big = numpy_helper.from_array(np.array([1, 2**40], np.int64), "big")
    small = numpy_helper.from_array(np.array([1, 2], np.int64), "small")
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    found = check(_graph(nodes, [X], [Y], [big, small]))
    assert [(f.severity, f.node) for f in found] == [("error", "big"), ("warning", "small")]
    assert "outside INT32" in found[0].message
    negative = numpy_helper.from_array(np.array([-(2**33)], np.int64), "neg")
    assert [f.node for f in _errors(_graph(nodes, [X], [Y], [negative]))] == ["neg"]


def test_trt_check_flags_uint8_weights() -> None:
    packed = numpy_helper.from_array(np.zeros((4, 2), np.uint8), "packed_table")
    (f,) = _errors(_graph([helper.make_node("Relu", ["x"], ["y"])], [X], [Y], [packed]))
    assert f.node == "packed_table" and "UINT8" in f.message


def test_trt_check_flags_a_dynamic_non_batch_axis_and_a_small_fixed_batch() -> None:
    dyn = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "features"])
    (f,) = _errors(_graph([helper.make_node("Relu", ["x"], ["y"])], [dyn], [Y]))
    assert f.node == "x" and "dynamic non-batch axis" in f.message
    fixed = helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 4])
    model = _graph([helper.make_node("Relu", ["x"], ["y"])], [fixed], [Y])
    (f,) = _errors(model, max_batch_size=256)
    assert "fixed batch axis 8" in f.message
    assert _errors(model, max_batch_size=8) == []
