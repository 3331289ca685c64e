"""Which models of a repository can be served, and why the others are left out (no server needed)."""

from __future__ import annotations

import shutil
from pathlib import Path

from recserve.triton.repository_plan import plan

ROOT = Path(__file__).resolve().parents[2]


def test_the_checked_in_repository_before_anything_is_built(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "model_repository", tmp_path / "repo")
    p = plan(tmp_path / "repo")
    assert p.servable == ["recommend_topk"] and p.broken == {}
    assert p.skipped["recommend"] == "needs ranker, which is not built (recserve build MODEL --name ranker)"
    assert p.skipped["recommend_preprocess"].startswith("needs ranker")
    assert "retrieve" in p.skipped and "retrieve_preprocess" in p.skipped


def test_a_built_ranker_makes_the_recommend_path_servable(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "model_repository", repo)
    (repo / "ranker" / "3").mkdir(parents=True)
    (repo / "ranker" / "3" / "model.onnx").write_bytes(b"onnx")
    (repo / "ranker" / "config.pbtxt").write_text('name: "ranker"\nbackend: "onnxruntime"\nmax_batch_size: 8\n')
    p = plan(repo)
    assert set(p.servable) == {"ranker", "recommend", "recommend_preprocess", "recommend_topk"}
    # retrieve still needs the retrieval models: the first missing one is named, with how to build it
    assert p.skipped["retrieve_preprocess"] == ("needs item_index, which is not built "
                                                "(recserve index RETRIEVER --ranker RANKER)")
    assert p.skipped["retrieve"].startswith("needs ")


def test_a_version_without_a_model_file_and_a_garbled_config(tmp_path: Path) -> None:
    (tmp_path / "empty" / "1").mkdir(parents=True)
    (tmp_path / "empty" / "config.pbtxt").write_text('name: "empty"\nbackend: "onnxruntime"\n')
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "config.pbtxt").write_text("this is { not a config")
    (tmp_path / ".hidden").mkdir()
    p = plan(tmp_path)
    assert p.servable == [] and p.skipped == {"empty": "no version with a model file; build it (recserve build)"}
    assert list(p.broken) == ["garbled"] and "does not parse" in p.broken["garbled"]
