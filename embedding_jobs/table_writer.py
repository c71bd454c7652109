"""Write feature tables (DESIGN.md contract 2) crash-safely, in parts that shards share out.

A table folder::

    manifest.json                      the plan (key count, part size, hash of the keys) and the metadata
    parts/part-00003-of-00012.parquet  one per unit of work: written to a temporary name, then os.replace'd
    table.parquet                      every part merged, sorted by key; written once all parts exist

The part file is the record that a unit of work is done: a process killed at any moment leaves either a
whole part or none (its temporary file is ignored and removed by the next run), so a rerun skips the
finished parts and never duplicates or loses a key. Parts are numbered over the sorted keys, so every
shard, and every rerun, agrees on which keys a part holds.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.atomic import fsync_dir
from recsys.features.reader import read_file
from recsys.features.table import (
    MANIFEST_FILE,
    MERGED_FILE,
    PARTS_DIR,
    FeatureTableError,
    FeatureTableMetadata,
)

MANIFEST_VERSION = 1
_PROVENANCE = ("created_at", "model_path")  # may differ between runs of the same table


@dataclass(frozen=True)
class TablePlan:
    """How a table's keys are cut into parts. Two runs with equal plans write the same parts."""

    num_keys: int
    part_size: int
    keys_sha256: str

    @classmethod
    def for_keys(cls, keys: np.ndarray, part_size: int) -> TablePlan:
        if part_size < 1:
            raise ValueError(f"part_size must be >= 1, got {part_size}")
        keys = np.asarray(keys, dtype=np.int64)
        if len(keys) and not (np.diff(keys) > 0).all():
            raise ValueError("keys must be strictly increasing")
        return cls(len(keys), part_size, hashlib.sha256(keys.tobytes()).hexdigest())

    @property
    def num_parts(self) -> int:
        return max(1, -(-self.num_keys // self.part_size))

    def part(self, index: int) -> slice:
        return slice(index * self.part_size, min((index + 1) * self.part_size, self.num_keys))


def write_table_file(path: Path, keys: np.ndarray, vectors: np.ndarray, metadata: FeatureTableMetadata) -> None:
    """Write one Parquet table file atomically: a reader sees the old file, or the whole new one."""
    keys = np.asarray(keys, dtype=np.int64)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.shape != (len(keys), metadata.dim):
        raise ValueError(f"{path}: vectors have shape {vectors.shape}, expected {(len(keys), metadata.dim)}")
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise FeatureTableError(f"{path}: the engine produced NaN or inf for {int(bad.sum())} key(s), e.g. "
                                f"{keys[bad][:5].tolist()}: refusing to write them")
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), metadata.dim)
    table = pa.Table.from_arrays([pa.array(keys, pa.int64()), embedding], schema=metadata.arrow_schema())
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class TableFolder:
    """One feature table's folder: its manifest, its parts, and the merged file."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.manifest = self.root / MANIFEST_FILE
        self.parts = self.root / PARTS_DIR
        self.merged = self.root / MERGED_FILE

    def part_path(self, index: int, plan: TablePlan) -> Path:
        return self.parts / f"part-{index:05d}-of-{plan.num_parts:05d}.parquet"

    def start(self, metadata: FeatureTableMetadata, plan: TablePlan) -> FeatureTableMetadata:
        """Create the manifest, or check that an existing one (an earlier run, another shard) was made for the
        same table. Returns the manifest's metadata, which every part of the table carries."""
        self.parts.mkdir(parents=True, exist_ok=True)
        content = {"format_version": MANIFEST_VERSION, "metadata": json.loads(metadata.to_json()),
                   "plan": asdict(plan)}
        tmp = self.root / f".{MANIFEST_FILE}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        try:
            os.link(tmp, self.manifest)  # atomic create-if-absent: shards starting together agree on one
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        existing, existing_plan = self._read_manifest()
        diff = metadata.differences(existing, ignore=_PROVENANCE)
        if diff:
            name = diff[0]
            raise FeatureTableError(
                f"{self.root}: this folder holds a table made with {name}={getattr(existing, name)!r}, this run has "
                f"{name}={getattr(metadata, name)!r} (differs in {diff}): pass another --out, or delete the folder "
                "to start over")
        if existing_plan != plan:
            raise FeatureTableError(f"{self.root}: this folder was planned as {existing_plan}, this run plans {plan} "
                                    "(another --part-size, or other keys): pass the same --part-size, another --out, "
                                    "or delete the folder to start over")
        return existing

    def _read_manifest(self) -> tuple[FeatureTableMetadata, TablePlan]:
        try:
            content = json.loads(self.manifest.read_text())
            plan = TablePlan(**content["plan"])
            meta = FeatureTableMetadata.from_json(json.dumps(content["metadata"]), str(self.manifest))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise FeatureTableError(f"{self.manifest}: unreadable manifest ({e}); delete the folder to start over"
                                    ) from None
        return meta, plan

    def finished_parts(self, metadata: FeatureTableMetadata, plan: TablePlan, keys: np.ndarray) -> set[int]:
        """Parts already written, each checked: readable, same metadata, exactly the keys the plan gives it."""
        done = set()
        for i in range(plan.num_parts):
            path = self.part_path(i, plan)
            if not path.exists():
                continue
            try:
                meta, part_keys, _ = read_file(path)
            except FeatureTableError as e:
                raise FeatureTableError(f"{e}. (A finished part of {self.root} is damaged; delete {path.name} and "
                                        "rerun to recompute it.)") from None
            diff = metadata.differences(meta)
            if diff:
                raise FeatureTableError(f"{path}: metadata differs from {self.manifest} in {diff}")
            if not np.array_equal(part_keys, keys[plan.part(i)]):
                raise FeatureTableError(f"{path}: holds other keys than the plan gives part {i}")
            done.add(i)
        return done

    def write_part(self, index: int, plan: TablePlan, keys: np.ndarray, vectors: np.ndarray,
                   metadata: FeatureTableMetadata) -> Path:
        path = self.part_path(index, plan)
        for stale in self.parts.glob(f".{path.name}.tmp-*"):
            stale.unlink(missing_ok=True)  # left by a killed run of this part
        write_table_file(path, keys, vectors, metadata)
        return path

    def merge_if_complete(self, metadata: FeatureTableMetadata, plan: TablePlan) -> bool:
        """Write ``table.parquet`` once every part exists. Returns whether the merged table exists."""
        paths = [self.part_path(i, plan) for i in range(plan.num_parts)]
        if not all(p.exists() for p in paths):
            return False
        if self.merged.exists():
            return True
        keys, vectors = [], []
        for p in paths:
            _, k, v = read_file(p)
            keys.append(k)
            vectors.append(v)
        all_keys = np.concatenate(keys)
        order = np.argsort(all_keys, kind="stable")
        write_table_file(self.merged, all_keys[order], np.concatenate(vectors)[order], metadata)
        return True
