"""atomic_dir replaces only what it wrote: a previous output (its marker) or an empty folder, never other data."""

from __future__ import annotations

import os

import pytest

from distilray.errors import DistilrayError
from distilray.io_utils import OUTPUT_MARKER, atomic_dir


def _write(path, text: str) -> None:
    with atomic_dir(path) as tmp:
        (tmp / "data.txt").write_text(text)


def test_atomic_dir_replaces_its_own_output_and_empty_folders(tmp_path):
    out = tmp_path / "out"
    _write(out, "one")
    assert (out / OUTPUT_MARKER).is_file() and (out / "data.txt").read_text() == "one"
    _write(out, "two")  # an earlier output of atomic_dir is replaced as a whole
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "data.txt"]
    assert (out / "data.txt").read_text() == "two"
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "empty", "three")
    assert (tmp_path / "empty" / "data.txt").read_text() == "three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]  # no temporary debris


def test_atomic_dir_refuses_a_folder_it_did_not_write(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    ran = []
    with pytest.raises(DistilrayError, match="refusing to replace .*work"):
        with atomic_dir(work) as tmp:
            ran.append(tmp)
    assert not ran  # refused before any work
    assert (work / "notes.txt").read_text() == "mine"
    # output_dir=. : the working directory is never wiped
    monkeypatch.chdir(work)
    with pytest.raises(DistilrayError, match="did not write"):
        _write(".", "x")
    assert sorted(os.listdir(work)) == ["notes.txt"] and sorted(os.listdir(tmp_path)) == ["work"]
    # a file at the path is not replaced either
    (tmp_path / "file").write_text("keep")
    with pytest.raises(DistilrayError, match="file"):
        _write(tmp_path / "file", "x")
    assert (tmp_path / "file").read_text() == "keep"


def test_atomic_dir_checks_again_before_the_swap(tmp_path):
    """Data put at the path while the output was being written is not deleted either."""
    out = tmp_path / "out"
    with pytest.raises(DistilrayError, match="refusing"):
        with atomic_dir(out) as tmp:
            (tmp / "data.txt").write_text("new")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the temporary folder is gone
