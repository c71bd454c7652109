"""Sharded checkpoints with torch.distributed.checkpoint, written atomically.

A checkpoint is a folder: DCP's shard files plus ``meta.json`` (epoch, metrics, early-stopping state).
Every rank writes its shards into ``.<name>.tmp``; after a barrier rank 0 adds ``meta.json`` and renames
the folder into place. A folder without ``meta.json`` (a crash mid-write) is never loaded. Loading goes
through DCP, which reads tensors and never runs code from the file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.optim import Optimizer

META = "meta.json"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    def __init__(self, root: Path, is_main: bool) -> None:
        self.root = Path(root)
        self.is_main = is_main

    def path(self, name: str) -> Path:
        return self.root / name

    def exists(self, name: str) -> bool:
        return (self.path(name) / META).is_file()

    def meta(self, name: str) -> dict[str, Any]:
        return json.loads((self.path(name) / META).read_text())

    def save(self, name: str, model: nn.Module, optimizer: Optimizer, meta: dict[str, Any]) -> None:
        final, tmp = self.path(name), self.root / f".{name}.tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=str(tmp))
        _barrier()
        if self.is_main:
            (tmp / META).write_text(json.dumps(meta, indent=2))
            old = self.root / f".{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        _barrier()

    def load(self, name: str, model: nn.Module, optimizer: Optimizer | None) -> dict[str, Any]:
        if not self.exists(name):
            raise FileNotFoundError(f"no complete checkpoint {self.path(name)} (missing {META})")
        path = str(self.path(name))
        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=path)
        model.load_state_dict(state["model"])
        if optimizer is not None:
            # Partial: a dummy step creates optimizer state for parameters that never had a gradient,
            # which the checkpoint rightly lacks. Every parameter's weights were loaded strictly above.
            state = {"optim": optimizer.state_dict()}
            dcp.load(state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))
            optimizer.load_state_dict(state["optim"])
        return self.meta(name)


def load_part(path: str | Path, module: nn.Module, target_prefix: str = "", source_prefix: str = "") -> int:
    """Load the tensors of ``module`` named ``target_prefix + rest`` from a checkpoint's ``source_prefix + rest``.

    It warm-starts part of a model from another run (a student's frozen teacher from the gain network's
    run: ``target_prefix="teacher."``) and exports a backbone from a task's checkpoint
    (``source_prefix="model."``). Sharded or not, on any number of ranks: DCP reshards. Every requested
    tensor must be in the checkpoint. Returns the number of tensors loaded.
    """
    path = Path(path)
    if not (path / META).is_file():
        raise FileNotFoundError(f"no complete checkpoint {path} (missing {META})")
    saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    own = {k: v for k, v in module.state_dict().items() if k.startswith(target_prefix)}
    wanted = {source_prefix + k[len(target_prefix):]: v for k, v in own.items()}
    missing = sorted(k for k in wanted if f"model.{k}" not in saved)
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}: "
                         "was it written by another backbone or configuration?")
    state = {"model": wanted}
    dcp.load(state, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=True))
    loaded = {target_prefix + k[len(source_prefix):]: v for k, v in state["model"].items()}
    module.load_state_dict(loaded, strict=False)
    return len(loaded)
