"""recsys.atomic: a folder is replaced whole or not at all, and a crash at any step leaves a complete folder."""

from __future__ import annotations

import os

import pytest

from recsys.atomic import atomic_dir, commit_dir, fresh_tmp, sibling


def _write(folder, text):
    (folder / "data.txt").write_text(text)


def test_success_replaces_and_an_error_keeps_the_old_folder(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        _write(tmp, "one")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        _write(tmp, "two")
        raise RuntimeError("the writer failed")
    assert (out / "data.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with atomic_dir(out) as tmp:
        _write(tmp, "three")
    assert (out / "data.txt").read_text() == "three" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("crash_after", ["writing", "moving the old folder away", "moving the new one in"])
def test_a_crash_at_any_step_of_a_commit_leaves_a_complete_folder(tmp_path, crash_after):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        _write(tmp, "old")
    tmp = fresh_tmp(out)
    _write(tmp, "new")
    if crash_after != "writing":
        os.replace(out, sibling(out, "old"))
    if crash_after == "moving the new one in":
        os.replace(tmp, out)
    # the process died here; the next writer starts with recovery
    expected = "new" if crash_after == "moving the new one in" else "old"
    fresh_tmp(out)
    assert (out / "data.txt").read_text() == expected
    assert not sibling(out, "old").exists()
    commit_dir(sibling(out, "tmp"), out)  # the empty new folder still commits
    assert list(out.iterdir()) == []
