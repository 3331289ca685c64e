"""Triton's response cache: a model built with ``response_cache: true`` on a server started with a cache."""

from __future__ import annotations

import numpy as np
import pytest
from router_fixtures import wait_until

from recserve.converters.build import build
from recserve.converters.triton_config import BuildProfile
from recserve.triton.client import TritonClient
from recserve.triton.server import EmbeddedTriton, ServerSettings

pytestmark = pytest.mark.slow


def test_repeated_request_is_served_from_the_response_cache(tmp_path, ranker_dir):
    repo = tmp_path / "repo"
    build(ranker_dir, "ranker", "onnxruntime", repo, BuildProfile(response_cache=True))
    settings = ServerSettings.on_free_ports(repo, cache_mb=8)
    with EmbeddedTriton(settings) as server, TritonClient(server.grpc_url) as client:
        n_sparse = client.config("ranker")["input"][0]["dims"][0]
        n_dense = client.config("ranker")["input"][1]["dims"][0]
        feed = {"sparse": np.ones((3, int(n_sparse)), np.int64), "dense": np.zeros((3, int(n_dense)), np.float32)}
        first = client.infer("ranker", feed)["score"]
        again = [client.infer("ranker", feed)["score"] for _ in range(3)]

        def stats() -> dict | None:  # Triton counts a call a moment after answering it
            s = client.statistics("ranker")["model_stats"][0]["inference_stats"]
            return s if int(s["cache_hit"].get("count", 0)) + int(s["cache_miss"].get("count", 0)) >= 4 else None

        stats = wait_until(stats, 10, what="Triton counting the 4 calls")
    assert all(np.array_equal(first, a) for a in again)
    assert int(stats["cache_hit"]["count"]) == 3
    assert int(stats["cache_miss"]["count"]) == 1
