"""The link between a compression report and a Triton version: the manifest ``recserve build`` writes, read as
the operator reads it (``recserve.operator.observe.candidate_source``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from recserve.operator.observe import candidate_source
from recserve.operator.spec import ModelRolloutSpec
from recserve.provenance import MANIFEST, file_sha256, manifest, source_sha256


def test_a_manifest_names_the_sha256_of_its_source(tmp_path: Path) -> None:
    src = tmp_path / "model.onnx"
    src.write_bytes(b"\x08\x07" * 100_000)
    version = tmp_path / "ranker" / "2"
    version.mkdir(parents=True)
    (version / MANIFEST).write_bytes(manifest(src))
    assert source_sha256(version) == file_sha256(src) == hashlib.sha256(src.read_bytes()).hexdigest()


def test_a_version_without_a_manifest_names_nothing_and_a_broken_one_is_an_error(tmp_path: Path) -> None:
    assert source_sha256(tmp_path) == ""
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match="is not a recserve manifest"):
        source_sha256(tmp_path)
    (tmp_path / MANIFEST).write_text('{"source_sha256": "abc"}')
    with pytest.raises(ValueError, match="not a sha256"):
        source_sha256(tmp_path)


def spec(repository: Path | None) -> ModelRolloutSpec:
    triton = {"grpcUrl": "t:8001", "metricsUrl": "http://t:8002/metrics"}
    if repository is not None:
        triton["modelRepository"] = str(repository)
    return ModelRolloutSpec.model_validate({
        "model": "ranker", "stableVersion": "1", "candidateVersion": "2", "steps": [{"weight": 10}],
        "triton": triton, "router": {"policyFile": "/tmp/p.json"}})


def test_the_operator_reads_the_candidates_manifest_from_the_repository(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    src.write_bytes(b"model")
    (tmp_path / "repo" / "ranker" / "2").mkdir(parents=True)
    assert candidate_source(spec(None)) == (None, None)
    assert candidate_source(spec(tmp_path / "repo")) == ("", None)
    (tmp_path / "repo" / "ranker" / "2" / MANIFEST).write_bytes(manifest(src))
    assert candidate_source(spec(tmp_path / "repo")) == (file_sha256(src), None)
    (tmp_path / "repo" / "ranker" / "2" / MANIFEST).write_text("[]")
    sha, error = candidate_source(spec(tmp_path / "repo"))
    assert sha is None and "is not a recserve manifest" in error
