"""Write a folder so that a crash at any point leaves either the old folder or the new one, never half of one.

Every writer of a folder (prepared datasets, checkpoints, exports, adapted and fine-tuned models) writes into
the sibling ``.<name>.tmp`` and commits it with two renames: the old folder to ``.<name>.old``, the new one
into place. A directory cannot be renamed over a non-empty one, so there is a moment with only ``.<name>.old``;
``recover_dir`` (which every write starts with) puts it back, so a rerun finds the last complete folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def sibling(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{kind}"


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover_dir(out: Path) -> None:
    """Undo what a crash during an earlier commit left: restore ``.<name>.old`` if ``out`` is gone, else drop it."""
    old = sibling(out, "old")
    if old.exists():
        if out.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, out)


def fresh_tmp(out: Path) -> Path:
    """An empty ``.<name>.tmp`` beside ``out`` (whatever an interrupted writer left there is removed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(out)
    tmp = sibling(out, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` into place as ``out``, replacing what was there."""
    old = sibling(out, "old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out: Path | str) -> Iterator[Path]:
    """``with atomic_dir(out) as tmp:`` write into ``tmp``; on success it becomes ``out``, on an error it goes."""
    out = Path(out)
    tmp = fresh_tmp(out)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_dir(tmp, out)


def write_text_atomic(path: Path | str, text: str) -> None:
    """Write a small file whole or not at all: into ``.<name>.tmp``, then renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling(path, "tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
