"""Atomic writes: the umask's ordinary modes (not mkstemp's 0600), whole folders replaced, nothing left behind."""

from __future__ import annotations

import contextlib
import os
import stat

import numpy as np
import pytest

from h3de.data.landmark_io import write_landmarks
from h3de.evaluate import evaluate_files
from h3de.io_utils import atomic_dir, atomic_path, atomic_write


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_atomic_outputs_follow_the_umask(tmp_path, mask, file_mode, dir_mode):
    with umask(mask):
        atomic_write(tmp_path / "a.txt", "x")
        with atomic_path(tmp_path / "b.png") as tmp:
            assert tmp.name.endswith(".png") and tmp.name.startswith(".b.png.")
            tmp.write_bytes(b"png")
        with atomic_dir(tmp_path / "folder") as tmp:
            atomic_write(tmp / "c.json", "{}")
    assert _mode(tmp_path / "a.txt") == _mode(tmp_path / "b.png") == file_mode
    assert _mode(tmp_path / "folder") == dir_mode and _mode(tmp_path / "folder" / "c.json") == file_mode


def test_an_evaluation_report_is_readable_by_others_under_umask_022(tmp_path):
    write_landmarks(tmp_path / "truth" / "c.mrk.json", ["A"], np.zeros((1, 3)))
    write_landmarks(tmp_path / "pred" / "c.csv", ["A"], np.ones((1, 3)))
    with umask(0o022):
        out = evaluate_files(tmp_path / "pred", tmp_path / "truth", tmp_path / "eval").out_dir
    written = sorted(p.name for p in out.iterdir())
    assert written == ["cpe.png", "errors.csv", "per_case.csv", "per_landmark.csv", "summary.json"]
    assert all(_mode(out / name) == 0o644 for name in written), {name: oct(_mode(out / name)) for name in written}


def test_atomic_dir_replaces_the_whole_folder_or_leaves_it_as_it_was(tmp_path):
    folder = tmp_path / "predictions"
    folder.mkdir()
    (folder / "stale.mrk.json").write_text("old")
    (folder / "kept_on_failure.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(folder) as tmp:
        (tmp / "half.txt").write_text("new")
        raise RuntimeError("a writer failed")
    assert sorted(p.name for p in folder.iterdir()) == ["kept_on_failure.txt", "stale.mrk.json"]
    with atomic_dir(folder) as tmp:
        assert tmp.parent == tmp_path and tmp.is_dir() and not any(tmp.iterdir())
        (tmp / "new.mrk.json").write_text("new")
    assert [p.name for p in folder.iterdir()] == ["new.mrk.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["predictions"]  # no temporary or old folder left


def test_atomic_path_leaves_no_temporary_file_on_failure(tmp_path):
    (tmp_path / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"] and (tmp_path / "a.txt").read_text() == "old"
