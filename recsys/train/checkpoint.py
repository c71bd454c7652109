"""Sharded checkpoints with torch.distributed.checkpoint, written atomically.

A checkpoint is a folder: DCP's shard files plus ``meta.json`` (epoch, metrics, early-stopping state).
Every rank writes its shards into ``.<name>.tmp``; after a barrier rank 0 adds ``meta.json`` and renames
the folder into place (``recsys.atomic``). A folder without ``meta.json`` (a crash mid-write) is never loaded.

Loading never runs code from the files. DCP itself would: its ``.metadata`` is a pickle that
``FileSystemReader`` reads with plain ``pickle.load``, and its planner reads non-tensor entries with
``torch.load(weights_only=False)``. Every read here goes through :class:`SafeReader` (the metadata through
an unpickler that admits only the classes DCP's metadata is made of, and data files only inside the
checkpoint folder) and :class:`SafeLoadPlanner` (non-tensor entries with ``weights_only=True``).
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.optim import Optimizer

from recsys.atomic import commit_dir, fresh_tmp, recover_dir, sibling

META = "meta.json"


class UnsafeCheckpointError(ValueError):
    """A checkpoint whose files could run code or reach outside its folder; the message names the file."""


# Everything a DCP ``.metadata`` pickle of this torch version is made of (read off real checkpoints).
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # looks a layout up by its name among torch's layouts
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"it refers to {module}.{name}, which is not part of DCP's metadata")


class SafeReader(FileSystemReader):
    """DCP's file-system reader, with the metadata read by a restricted unpickler and every data file checked
    to be a regular file inside the checkpoint folder (no ``..``, no absolute path, no symlink out)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        folder = Path(self.path)
        if folder.is_symlink():  # the writer renames a real folder into place; a link points elsewhere
            raise UnsafeCheckpointError(f"checkpoint folder {folder} is a symbolic link (to {folder.resolve()})")
        _check_inside(path, folder)
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except UnsafeCheckpointError as e:
            raise UnsafeCheckpointError(f"refusing checkpoint metadata {path}: {e}") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
            raise UnsafeCheckpointError(f"checkpoint metadata {path} is not a DCP metadata file: {e}") from None
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(f"checkpoint metadata {path} holds a {type(metadata).__name__}, not DCP "
                                        "Metadata")
        for info in (metadata.storage_data or {}).values():
            _check_inside(folder / info.relative_path, folder)
        if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader.read_metadata does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _check_inside(path: Path, folder: Path) -> None:
    root = folder.resolve()
    real = path.resolve()
    if real != root and root not in real.parents:
        raise UnsafeCheckpointError(f"checkpoint file {path} points outside its folder {folder} (to {real})")
    if path.is_symlink():
        raise UnsafeCheckpointError(f"checkpoint file {path} is a symbolic link; a checkpoint holds plain files")


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, but non-tensor entries are unpickled with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(f"refusing checkpoint entry {read_item.dest_index.fqn!r}: {e}") from None
        super().load_bytes(read_item, _pickled(obj))


def _pickled(obj: Any) -> io.BytesIO:
    """``obj`` saved again, for the parent planner's reader (it is plain data now)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def _load(state: dict[str, Any], path: Path | str, partial: bool = False) -> None:
    saved_tensors(path)  # refuse hostile metadata here: inside dcp.load the error comes back re-wrapped
    try:
        dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner(allow_partial_load=partial))
    except CheckpointException as e:  # a BaseException: unwrap our refusal so that callers see it as such
        for exc, _ in e.failures.values():
            if isinstance(exc, UnsafeCheckpointError):
                raise UnsafeCheckpointError(str(exc)) from None
        raise


class CheckpointMismatchError(ValueError):
    """A checkpoint of another model (other tensors or shapes) where this model's was expected."""


def _check_same_model(own: dict[str, Any], saved: dict[str, Any], path: Path, partial: bool = False) -> None:
    """Refuse, naming the tensors, a checkpoint whose model tensors are not ``own`` (a run folder written by
    another configuration or code version): DCP would fail on the first one, deep in its planner. With
    ``partial``, ``own`` is the part wanted and the checkpoint may hold more."""
    have = {k.removeprefix("model."): m for k, m in saved.items() if k.startswith("model.")}
    missing, extra = sorted(own.keys() - have.keys()), [] if partial else sorted(have.keys() - own.keys())
    resized = sorted(k for k in own.keys() & have.keys() if hasattr(own[k], "size") and hasattr(have[k], "size")
                     and tuple(own[k].size()) != tuple(have[k].size))
    if missing or extra or resized:
        parts = [f"{what} {len(names)} tensor(s) {names[:3]}{' and more' if len(names) > 3 else ''}"
                 for what, names in (("lacks", missing), ("has unknown", extra), ("has other shapes of", resized))
                 if names]
        raise CheckpointMismatchError(
            f"{path} is not a checkpoint of this model: it {', '.join(parts)}. The run folder was written by "
            "another backbone, configuration or code version: move it away or give the run another name")


def saved_tensors(path: Path | str) -> dict[str, Any]:
    """The names (and storage metadata) of what checkpoint ``path`` holds, read safely."""
    return SafeReader(str(path)).read_metadata().state_dict_metadata


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    def __init__(self, root: Path, is_main: bool) -> None:
        self.root = Path(root)
        self.is_main = is_main
        if is_main and self.root.is_dir():  # a crash halfway through a commit left only ".<name>.old"
            for old in self.root.glob(".*.old"):
                recover_dir(self.root / old.name[1:-len(".old")])
        _barrier()

    def path(self, name: str) -> Path:
        return self.root / name

    def exists(self, name: str) -> bool:
        return (self.path(name) / META).is_file()

    def meta(self, name: str) -> dict[str, Any]:
        return json.loads((self.path(name) / META).read_text())

    def save(self, name: str, model: nn.Module, optimizer: Optimizer, meta: dict[str, Any]) -> None:
        final, tmp = self.path(name), sibling(self.path(name), "tmp")
        if self.is_main:
            fresh_tmp(final)
        _barrier()
        # One file per tensor: DCP's writer clones each view into FBGEMM's flat weights and keeps every clone
        # of a file alive until the file is closed, so one file per rank doubles the tables' memory at save.
        dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()},
                 storage_writer=FileSystemWriter(tmp, single_file_per_rank=False))
        _barrier()
        if self.is_main:
            (tmp / META).write_text(json.dumps(meta, indent=2))
            commit_dir(tmp, final)
        _barrier()

    def load(self, name: str, model: nn.Module, optimizer: Optimizer | None) -> dict[str, Any]:
        if not self.exists(name):
            raise FileNotFoundError(f"no complete checkpoint {self.path(name)} (missing {META})")
        path = str(self.path(name))
        state = {"model": model.state_dict()}
        _check_same_model(state["model"], saved_tensors(path), self.path(name))
        _load(state, path)
        model.load_state_dict(state["model"])
        if optimizer is not None:
            # Partial: a dummy step creates optimizer state for parameters that never had a gradient,
            # which the checkpoint rightly lacks. Every parameter's weights were loaded strictly above.
            state = {"optim": optimizer.state_dict()}
            _load(state, path, partial=True)
            optimizer.load_state_dict(state["optim"])
        return self.meta(name)


def load_part(path: str | Path, module: nn.Module, target_prefix: str = "", source_prefix: str = "") -> int:
    """Load the tensors of ``module`` named ``target_prefix + rest`` from a checkpoint's ``source_prefix + rest``.

    It warm-starts part of a model from another run (a student's frozen teacher from the gain network's
    run: ``target_prefix="teacher."``) and exports a backbone from a task's checkpoint
    (``source_prefix="model."``). Sharded or not, on any number of ranks: DCP reshards. Every requested
    tensor must be in the checkpoint, with its shape. Returns the number of tensors loaded.
    """
    path = Path(path)
    if not (path / META).is_file():
        raise FileNotFoundError(f"no complete checkpoint {path} (missing {META})")
    own = {k: v for k, v in module.state_dict().items() if k.startswith(target_prefix)}
    wanted = {source_prefix + k[len(target_prefix):]: v for k, v in own.items()}
    _check_same_model(wanted, saved_tensors(path), path, partial=True)
    state = {"model": wanted}
    _load(state, path, partial=True)
    loaded = {target_prefix + k[len(source_prefix):]: v for k, v in state["model"].items()}
    # the rest of the module keeps its own tensors, loaded back with the part: a sharded embedding
    # collection's load hook requires its tables to be present
    module.load_state_dict(module.state_dict() | loaded)
    return len(loaded)


def load_warm_start(parts: dict[str, tuple[str, str]], module: nn.Module) -> list[tuple[str, str, int]]:
    """Load a task's ``warm_start()`` parts (``{prefix: (checkpoint, source prefix)}``) into ``module`` (the task,
    sharded or not); returns ``(prefix, checkpoint, tensors loaded)`` per part."""
    return [(prefix, path, load_part(path, module, target_prefix=prefix, source_prefix=source))
            for prefix, (path, source) in parts.items()]
