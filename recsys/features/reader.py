"""Read a feature table into a dense tensor aligned to the prepared dataset's ids, refusing anything off.

Example::

    >>> from recsys.features import load_feature_table
    >>> t = load_feature_table("runs/features/ml-100k/item", expect_fingerprint=schema.fingerprint,
    ...                        expect_entity="item", num_rows=schema.field("item_id").vocab_size)  # doctest: +SKIP
    >>> t.embeddings.shape  # doctest: +SKIP
    torch.Size([1684, 384])
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recsys.features.table import (
    EMBEDDING_COLUMN,
    KEY_COLUMN,
    MANIFEST_FILE,
    MERGED_FILE,
    METADATA_KEY,
    PART_GLOB,
    PARTS_DIR,
    FeatureEntity,
    FeatureTableError,
    FeatureTableMetadata,
)

MissingPolicy = Literal["error", "zero"]
_NOT_COMPARED = ("created_at", "model_path")  # provenance that may differ between the parts of one table


@dataclass(frozen=True)
class FeatureTable:
    """A loaded table: row ``i`` of ``embeddings`` is the vector of prepared id (or field position) ``i``."""

    embeddings: torch.Tensor  # [num_rows, dim] float32; zero where mask is False
    mask: torch.Tensor  # [num_rows] bool: the table holds a vector for this row
    num_missing: int  # rows without a vector, not counting the reserved padding/unknown ids
    metadata: FeatureTableMetadata
    files: tuple[Path, ...]


def table_files(path: str | Path) -> list[Path]:
    """The Parquet files of a table: the file itself, or a folder's merged table, else its part files."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FeatureTableError(f"feature table {path} does not exist")
    if (path / MERGED_FILE).is_file():
        return [path / MERGED_FILE]
    parts = sorted((path / PARTS_DIR).glob(PART_GLOB))
    if not parts:
        raise FeatureTableError(f"{path}: no feature table here (neither {MERGED_FILE} nor {PARTS_DIR}/{PART_GLOB}); "
                                "was the embedding job run with this --out?")
    return parts


def read_metadata(file: Path) -> FeatureTableMetadata:
    """The metadata of one table file, after checking that its columns have the contract's types."""
    try:
        schema = pq.read_schema(file)
    except (OSError, pa.ArrowException) as e:
        raise FeatureTableError(f"{file}: not a readable Parquet file ({e}); delete it and rerun the job") from None
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise FeatureTableError(f"{file}: no {METADATA_KEY.decode()!r} metadata: not a feature table")
    meta = FeatureTableMetadata.from_json(raw, str(file))
    expected = pa.list_(pa.float32(), meta.dim)
    if schema.names != [KEY_COLUMN, EMBEDDING_COLUMN]:
        raise FeatureTableError(f"{file}: columns are {schema.names}, expected [{KEY_COLUMN!r}, {EMBEDDING_COLUMN!r}]")
    if schema.field(KEY_COLUMN).type != pa.int64():
        raise FeatureTableError(f"{file}: column {KEY_COLUMN!r} is {schema.field(KEY_COLUMN).type}, expected int64")
    if schema.field(EMBEDDING_COLUMN).type != expected:
        raise FeatureTableError(f"{file}: column {EMBEDDING_COLUMN!r} is {schema.field(EMBEDDING_COLUMN).type}, "
                                f"expected {expected} (dim {meta.dim} from the metadata)")
    return meta


def read_file(file: Path) -> tuple[FeatureTableMetadata, np.ndarray, np.ndarray]:
    """``(metadata, keys [n] int64, vectors [n, dim] float32)`` of one table file, NaN/inf refused."""
    meta = read_metadata(file)
    try:
        table = pq.read_table(file)
    except (OSError, pa.ArrowException) as e:
        raise FeatureTableError(f"{file}: cannot read the rows ({e}); delete it and rerun the job") from None
    keys = table.column(KEY_COLUMN).to_numpy().astype(np.int64, copy=False)
    emb = table.column(EMBEDDING_COLUMN).combine_chunks()
    if emb.null_count or (len(emb) and emb.values.null_count):
        raise FeatureTableError(f"{file}: null embeddings")
    vectors = emb.values.to_numpy(zero_copy_only=False).reshape(len(keys), meta.dim)
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise FeatureTableError(f"{file}: {int(bad.sum())} vector(s) with NaN or inf, e.g. key {int(keys[bad][0])}")
    return meta, keys, vectors


def check_expected(meta: FeatureTableMetadata, where: str, *, fingerprint: str | None, entity: str | None,
                   table: str | None, dim: int | None) -> None:
    """Refuse a table made for another dataset, entity, vocabulary or size, naming what differs."""
    expected = {"dataset_fingerprint": fingerprint, "entity": FeatureEntity(entity) if entity else None,
                "table": table, "dim": dim}
    for name, want in expected.items():
        have = getattr(meta, name)
        if want is not None and have != want:
            hint = " (the prepared dataset changed: rerun the embedding job)" if name == "dataset_fingerprint" else ""
            raise FeatureTableError(f"{where}: {name} is {str(have)!r} but the caller expects {str(want)!r}{hint}")


def load_feature_table(path: str | Path, *, expect_fingerprint: str, expect_entity: str,
                       expect_table: str | None = None, expect_dim: int | None = None,
                       num_rows: int | None = None, missing: MissingPolicy = "error") -> FeatureTable:
    """Load a table (a file, or a folder written by ``embedding_jobs``) as a dense ``[num_rows, dim]`` tensor.

    ``num_rows`` defaults to the size of the key space recorded in the metadata (the vocabulary size, or
    the number of fields). Every key must lie in ``[0, num_rows)`` and appear once. Rows the table lacks are
    an error unless ``missing="zero"``: then they are zero vectors, ``mask`` is False there and
    ``num_missing`` counts them. Padding and unknown ids (0 and 1) of id-keyed tables are always zero and
    masked, and never count as missing.
    """
    if missing not in ("error", "zero"):
        raise ValueError(f"missing must be 'error' or 'zero', got {missing!r}")
    files = table_files(path)
    first_meta: FeatureTableMetadata | None = None
    all_keys, all_vectors, owner = [], [], []
    for i, file in enumerate(files):
        meta, keys, vectors = read_file(file)
        if first_meta is None:
            first_meta = meta
            check_expected(meta, str(file), fingerprint=expect_fingerprint, entity=expect_entity,
                           table=expect_table, dim=expect_dim)
        else:
            diff = first_meta.differences(meta, ignore=_NOT_COMPARED)
            if diff:
                raise FeatureTableError(f"{file}: metadata differs from {files[0]} in {diff}: parts of different "
                                        "jobs are mixed in one folder")
        all_keys.append(keys)
        all_vectors.append(vectors)
        owner.append(np.full(len(keys), i))
    assert first_meta is not None
    meta = first_meta
    rows = meta.num_rows if num_rows is None else num_rows
    keys = np.concatenate(all_keys)
    vectors = np.concatenate(all_vectors) if all_vectors else np.zeros((0, meta.dim), np.float32)
    where = str(path)
    _check_keys(keys, np.concatenate(owner), files, rows, meta.reserved_keys, where)

    embeddings = np.zeros((rows, meta.dim), dtype=np.float32)
    embeddings[keys] = vectors
    mask = np.zeros(rows, dtype=bool)
    mask[keys] = True
    expected_rows = np.ones(rows, dtype=bool)
    expected_rows[[k for k in meta.reserved_keys if k < rows]] = False
    absent = np.flatnonzero(expected_rows & ~mask)
    if len(absent) and missing == "error":
        raise FeatureTableError(f"{where}: {len(absent)} of {int(expected_rows.sum())} keys have no vector, "
                                f"e.g. {absent[:5].tolist()}{_progress_hint(Path(path), files)}; pass missing='zero' "
                                "to use zero vectors for them")
    return FeatureTable(torch.from_numpy(embeddings), torch.from_numpy(mask), int(len(absent)), meta, tuple(files))


def _check_keys(keys: np.ndarray, owner: np.ndarray, files: list[Path], rows: int, reserved: tuple[int, ...],
                where: str) -> None:
    out = (keys < 0) | (keys >= rows)
    if out.any():
        raise FeatureTableError(f"{files[owner[out][0]]}: key {int(keys[out][0])} is outside [0, {rows}) "
                                f"({int(out.sum())} such keys): the table was made for a larger vocabulary")
    if reserved:
        hit = np.isin(keys, reserved)
        if hit.any():
            raise FeatureTableError(f"{files[owner[hit][0]]}: holds reserved key {int(keys[hit][0])} "
                                    f"(ids {list(reserved)} are padding and unknown and carry no vector)")
    order = np.argsort(keys, kind="stable")
    dup = np.flatnonzero(keys[order][1:] == keys[order][:-1])
    if len(dup):
        a, b = order[dup[0]], order[dup[0] + 1]
        raise FeatureTableError(f"{where}: key {int(keys[a])} appears more than once ({len(dup)} duplicates), "
                                f"in {files[owner[a]]} and {files[owner[b]]}")


def _progress_hint(path: Path, files: list[Path]) -> str:
    """Say whether the job that writes this folder is unfinished, from its manifest."""
    manifest = path / MANIFEST_FILE
    if not path.is_dir() or not manifest.is_file() or (path / MERGED_FILE).is_file():
        return ""
    try:
        plan = json.loads(manifest.read_text())["plan"]
        num_parts = max(1, -(-int(plan["num_keys"]) // int(plan["part_size"])))
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return ""
    return f" (only {len(files)} of {num_parts} parts are written: the job is unfinished or still running)"
