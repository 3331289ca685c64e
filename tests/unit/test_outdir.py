"""The ``--out`` rule every writer shares, and the encoder export's swap of a complete directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from recserve.encoder.export import _write
from recserve.errors import ConfigError
from recserve.outdir import check_out

OWNED = ("model.onnx", "encoder.json")


def test_a_new_or_empty_directory_is_fine(tmp_path: Path) -> None:
    check_out(tmp_path / "new", False, OWNED, "x")
    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "empty", False, OWNED, "x")


def test_an_earlier_output_needs_force_and_foreign_files_refuse_it(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_text("old")
    with pytest.raises(ConfigError, match="not empty .*--force to replace an earlier `x` output"):
        check_out(tmp_path, False, OWNED, "x")
    check_out(tmp_path, True, OWNED, "x")
    (tmp_path / "mine.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"did not write \(mine.txt\)"):
        check_out(tmp_path, True, OWNED, "x")


def test_a_file_is_not_an_output_directory(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        check_out(tmp_path / "f", True, OWNED, "x")


def test_the_new_directory_replaces_the_old_whole_and_leaves_nothing_beside_it(tmp_path: Path) -> None:
    out = tmp_path / "enc"
    _write(out, {"model.onnx": b"one", "encoder.json": b"{}"})
    _write(out, {"model.onnx": b"two"})
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"] and (out / "model.onnx").read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc"], "no staging directory left behind"


def test_a_failed_write_leaves_the_earlier_output_as_it_was(tmp_path: Path) -> None:
    out = tmp_path / "enc"
    _write(out, {"model.onnx": b"one"})
    with pytest.raises(IsADirectoryError):
        _write(out, {"model.onnx": b"two", "": b"a name that cannot be written"})
    assert (out / "model.onnx").read_bytes() == b"one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc"]
