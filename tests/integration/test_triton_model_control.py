"""Triton's model control API in explicit mode: load only what is asked, add a version, serve both, unload."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import triton_fixtures
from triton_fixtures import TrainedModels, ort_run, start_triton

from recserve.converters.build import build
from recserve.converters.triton_config import BuildProfile
from recserve.data.schema import Dataset
from recserve.errors import ConfigError, InferenceError
from recserve.triton.client import TritonClient
from recserve.triton.retrieval import build_retrieval

pytestmark = pytest.mark.slow

# session fixtures shared by the Triton modules (the models are trained once, see triton_fixtures)
triton_models = triton_fixtures.triton_models
ranker_data = triton_fixtures.ranker_data


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, triton_models: TrainedModels) -> Path:
    repo = tmp_path_factory.mktemp("explicit-repo")
    build(triton_models.ranker, "ranker", "onnxruntime", repo, BuildProfile())
    build_retrieval(triton_models.two_tower, triton_models.ranker, None, repo)  # in the repository, never loaded
    return repo


@pytest.fixture(scope="module")
def client(repo: Path):
    srv = start_triton(repo, model_control="explicit", load_models=["ranker"])
    try:
        with TritonClient(srv.grpc_url, timeout=30) as c:
            yield c
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def feed(ranker_data: Dataset) -> dict[str, np.ndarray]:
    t = ranker_data.ranking_test
    return {"sparse": t.sparse[:9], "dense": t.dense[:9]}


def test_explicit_mode_loads_only_the_listed_models(client: TritonClient, feed) -> None:
    assert client.model_ready("ranker")
    assert client.model_ready("ranker", "1")
    assert not client.model_ready("user_tower")
    assert not client.model_ready("item_index")
    states = {m["name"]: m.get("state") for m in client.repository_index()}
    assert states["ranker"] == "READY" and states["user_tower"] != "READY"
    with pytest.raises(InferenceError):
        client.infer("user_tower", {"user_sparse": np.ones((1, 1), np.int64)})
    assert client.infer("ranker", feed)["score"].shape == (9, 1)


def test_add_a_version_load_both_by_config_override_then_unload(client: TritonClient, repo: Path,
                                                                 triton_models: TrainedModels, feed) -> None:
    (want_v1,) = ort_run(triton_models.ranker / "model.onnx", feed)
    (want_v2,) = ort_run(triton_models.ranker_b / "model.onnx", feed)
    assert not np.allclose(want_v1, want_v2, atol=1e-4), "the two versions must be told apart by their scores"

    result = build(triton_models.ranker_b, "ranker", "onnxruntime", repo, BuildProfile())
    assert result.version_dir == repo / "ranker" / "2"
    with pytest.raises(ConfigError):  # the served version 1 is never overwritten
        build(triton_models.ranker_b, "ranker", "onnxruntime", repo, BuildProfile(), version=1)
    # explicit mode: nothing changes until a load request
    assert not client.model_ready("ranker", "2")
    np.testing.assert_allclose(client.infer("ranker", feed)["score"], want_v1, rtol=1e-5, atol=1e-6)

    # a plain reload follows the repository's config: latest 1 version -> only version 2
    client.load("ranker")
    assert client.model_ready("ranker", "2") and not client.model_ready("ranker", "1")
    np.testing.assert_allclose(client.infer("ranker", feed)["score"], want_v2, rtol=1e-5, atol=1e-6)

    # a config override selecting both versions
    cfg = client.config("ranker")
    cfg["version_policy"] = {"specific": {"versions": [1, 2]}}
    client.load("ranker", config=json.dumps(cfg))
    assert client.model_ready("ranker", "1") and client.model_ready("ranker", "2")
    assert [int(v) for v in client.config("ranker")["version_policy"]["specific"]["versions"]] == [1, 2]
    np.testing.assert_allclose(client.infer("ranker", feed, version="1")["score"], want_v1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(client.infer("ranker", feed, version="2")["score"], want_v2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(client.infer("ranker", feed)["score"], want_v2, rtol=1e-5, atol=1e-6)
    with pytest.raises(InferenceError):
        client.infer("ranker", feed, version="3")

    client.unload("ranker")
    assert not client.model_ready("ranker")
    assert not client.model_ready("ranker", "1") and not client.model_ready("ranker", "2")
    with pytest.raises(InferenceError):
        client.infer("ranker", feed)


def test_a_request_for_an_unloaded_version_is_an_inference_error(client: TritonClient, repo: Path,
                                                                 triton_models: TrainedModels, feed) -> None:
    if not (repo / "ranker" / "2").exists():
        build(triton_models.ranker_b, "ranker", "onnxruntime", repo, BuildProfile())
    client.load("ranker")  # the repository's config: the latest version, 2
    assert client.model_ready("ranker", "2")
    client.unload("ranker")
    assert client.repository_index()  # the server is up and answering
    with pytest.raises(InferenceError):
        client.infer("ranker", feed, version="2")


def test_loading_a_model_missing_from_the_repository_is_an_inference_error(client: TritonClient) -> None:
    with pytest.raises(InferenceError, match="no_such_model"):
        client.load("no_such_model")
