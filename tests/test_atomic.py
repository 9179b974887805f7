"""atomic_directory: the target is the old directory or the new one, never a mix, and no leftovers."""

from __future__ import annotations

import os

import pytest

from dlp_lora._atomic import atomic_directory


def test_new_directory_and_replacement(tmp_path):
    target = tmp_path / "sub" / "out"
    with atomic_directory(target) as tmp:
        assert tmp.parent == target.parent and not target.exists()
        (tmp / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    target.chmod(0o700)
    with atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert target.stat().st_mode & 0o777 == 0o700  # an existing directory keeps its mode
    assert sorted(p.name for p in target.parent.iterdir()) == ["out"]


def test_failure_in_the_body_keeps_the_old_directory(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="writer failed"), atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("half")
        raise RuntimeError("writer failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]


def test_failed_swap_puts_the_old_directory_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the second rename moves the new directory in
            raise OSError("simulated failure")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated"), atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]


def test_refuses_a_file_as_target(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"), atomic_directory(tmp_path / "f"):
        pytest.fail("the body must not run")
