"""Stream a prepared split from Parquet into TorchRec ``Batch`` objects.

Rows are split across ranks in contiguous, disjoint ranges; each rank reads only the row groups that
overlap its range, a window of row groups at a time, as numpy columns (never one Python object per row).
With ``shuffle`` the row-group order and the rows inside each window are permuted, seeded by
``(seed, epoch, rank)``. Every rank yields the same number of equally sized batches (sharded embeddings
need all ranks in every step); the last one is padded with rows of weight 0.

Example::

    schema = PreparedSchema.load("runs/data/ml-100k")
    batches = ParquetBatches("runs/data/ml-100k", "train", schema, batch_size=1024, shuffle=True)
    for epoch in range(3):
        batches.set_epoch(epoch)
        for batch in batches:
            ...
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.batch import LABELED, Batch
from recsys.data.lists import Lists
from recsys.data.schema import PAD_ID, UNK_ID, FieldKind, PreparedField, PreparedSchema


@dataclass
class Chunk:
    """Some rows of a split as numpy columns."""

    labels: np.ndarray
    dense: np.ndarray  # [rows, num_dense]
    sparse: list[np.ndarray | Lists]  # per sparse field: ids (single-valued) or Lists
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # [rows] or [rows, L] per extra column

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray) -> Chunk:
        return Chunk(self.labels[idx], self.dense[idx],
                     [c.take(idx) if isinstance(c, Lists) else c[idx] for c in self.sparse],
                     {k: v[idx] for k, v in self.extras.items()})

    def slice(self, start: int, stop: int) -> Chunk:
        return self.take(np.arange(start, min(stop, len(self)), dtype=np.int64))

    @staticmethod
    def concat(chunks: list[Chunk]) -> Chunk:
        if len(chunks) == 1:
            return chunks[0]
        sparse = []
        for cols in zip(*(c.sparse for c in chunks), strict=True):
            if isinstance(cols[0], Lists):
                lengths = np.concatenate([np.diff(c.offsets) for c in cols])
                offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
                np.cumsum(lengths, out=offsets[1:])
                sparse.append(Lists(offsets, np.concatenate([c.values for c in cols])))
            else:
                sparse.append(np.concatenate(cols))
        extras = {k: np.concatenate([c.extras[k] for c in chunks]) for k in chunks[0].extras}
        return Chunk(np.concatenate([c.labels for c in chunks]), np.concatenate([c.dense for c in chunks]), sparse,
                     extras)


def embedding_lookup(folder: str | Path, schema: PreparedSchema, min_count: int,
                     unlabeled: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Per embedding table, the row each id reads: its own, or the unknown id's when it occurs fewer than
    ``min_count`` times in the training rows.

    An id with no training row would otherwise read a row that no gradient ever reached (its random initial
    value): cold users and items, values seen only in validation or test, every id a subsampled training
    split lost. They share the unknown id's row instead, and with ``min_count`` >= 2 that row is trained, on
    the ids that occur only once. The model inputs (and the ids language-model tables are keyed by) stay as
    they are; only the embedding lookup changes, and an export bakes the same mapping into its tables.

    ``unlabeled`` splits (``data.unlabeled_splits``: rows that join training without their labels) count like
    training rows: an id they hold often enough reads its own row, which those rows train (by distillation).
    Such a lookup only ever sends to ``<unk>`` a subset of what the training rows alone send there.
    """
    out: dict[str, np.ndarray] = {}
    if min_count < 1:
        raise ValueError(f"data.min_count={min_count}: must be >= 1 (1: only ids with no training row share <unk>)")
    for f in schema.sparse_fields:
        if f.table in out:
            continue
        vocab = pq.read_table(Path(folder) / f"vocab/{f.table}.parquet")
        if "train_rows" not in vocab.column_names:
            raise ValueError(f"{folder}: vocabulary {f.table} has no train_rows: the dataset was prepared by an "
                             "older version; prepare it again (python -m recsys.prepare)")
        counts = vocab.column("train_rows").to_numpy()
        for split in unlabeled:
            counts = counts + _occurrences(Path(folder) / f"{split}.parquet", schema, f.table, len(counts))
        lookup = np.arange(len(counts), dtype=np.int64)
        lookup[counts < min_count] = UNK_ID
        lookup[PAD_ID] = PAD_ID
        out[f.table] = lookup
    return out


def _occurrences(path: Path, schema: PreparedSchema, table: str, vocab_size: int) -> np.ndarray:
    """How often each id of vocabulary ``table`` occurs in the split file ``path`` (every field using it)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: data.unlabeled_splits names a split the dataset does not have")
    counts = np.zeros(vocab_size, dtype=np.int64)
    for f in (f for f in schema.sparse_fields if f.table == table):
        col = pq.read_table(path, columns=[f.name]).column(f.name)
        ids = (col.to_numpy() if f.kind is FieldKind.CATEGORICAL else Lists.from_arrow(col).values).astype(np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"{path}: column {f.name} holds ids outside vocabulary {table} (0..{vocab_size - 1}): "
                             "the file was not prepared with this dataset")
        counts += np.bincount(ids, minlength=vocab_size)
    return counts


class ParquetBatches:
    """One rank's batches of one split of a prepared dataset.

    ``extra_columns`` are read from the split file into ``Batch.extras``; each ``side_files`` entry is a
    Parquet file aligned with the split row for row and row group for row group (a per-row cache a job wrote
    from the split, such as token ids), all of whose columns go into ``Batch.extras``. Extra columns are
    numbers or fixed-size lists of numbers. ``lookup`` (see :func:`embedding_lookup`) maps each table's ids
    to the rows the embeddings read; extra columns keep the stored ids.

    ``unlabeled`` splits join the split's rows without their labels (label 0, ``Batch.extras[LABELED]`` 0;
    the split's own rows have 1 there), shuffled in with them: impressions a distilled student learns from
    through its teacher's scores alone. Every rank takes its share of each.
    """

    def __init__(
        self,
        folder: str | Path,
        split: str,
        schema: PreparedSchema,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        window_row_groups: int = 8,
        extra_columns: tuple[str, ...] = (),
        side_files: tuple[str | Path, ...] = (),
        lookup: dict[str, np.ndarray] | None = None,
        unlabeled: Sequence[str] = (),
    ) -> None:
        self.path = Path(folder) / f"{split}.parquet"
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} not found: is {folder} a prepared dataset?")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.schema, self.batch_size, self.rank, self.world_size = schema, batch_size, rank, world_size
        self.shuffle, self.seed, self.window = shuffle, seed, window_row_groups
        self.epoch = 0
        self._file = pq.ParquetFile(self.path)
        self.sparse_fields = [f for f in schema.sparse_fields]
        self.dense_names = [f.name for f in schema.dense_fields]
        self.keys = [f.name for f in self.sparse_fields]
        self.extra_columns = list(extra_columns)
        self.lookup = lookup
        if split in unlabeled or len(set(unlabeled)) != len(unlabeled):
            raise ValueError(f"unlabeled splits {list(unlabeled)} must differ from each other and from {split!r}")
        if unlabeled and side_files:
            raise ValueError(f"unlabeled splits {list(unlabeled)} cannot join {split!r}: its rows come with side "
                             "files, which the unlabeled splits lack")
        # the split's own file, then each unlabeled split's: (path, file, labeled)
        self._sources = [(self.path, self._file, True)]
        for u in unlabeled:
            path = Path(folder) / f"{u}.parquet"
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: the unlabeled split {u!r} is not in {folder}")
            self._sources.append((path, pq.ParquetFile(path), False))
        for path, file, _ in self._sources:
            names = file.schema_arrow.names
            missing = [f.name for f in schema.fields if f.name not in names]
            if missing:
                raise ValueError(f"{path} lacks the columns {missing} that its schema.json lists")
            absent = [c for c in extra_columns if c not in names]
            if absent:
                raise ValueError(f"{path} has no column(s) {absent}; its columns: {names}")
        self._sides = [_aligned(Path(p), self._file, self.path) for p in side_files]
        sizes = [file.metadata.num_rows for _, file, _ in self._sources]
        self.num_rows = sum(sizes)
        self.rows_by_split = dict(zip([split, *unlabeled], sizes, strict=True))
        self._ranges = [(rank * n // world_size, (rank + 1) * n // world_size) for n in sizes]
        self._rows_per_rank_max = max(sum((r + 1) * n // world_size - r * n // world_size for n in sizes)
                                      for r in range(world_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self._rows_per_rank_max / self.batch_size)

    # ------------------------------------------------------------------------------------------
    def _row_groups(self) -> list[tuple[int, int, int, int]]:
        """(source, row group, first row to keep, end row) within this rank's range of each source."""
        out = []
        for s, ((_, file, _), (first, last)) in enumerate(zip(self._sources, self._ranges, strict=True)):
            start = 0
            for g in range(file.metadata.num_row_groups):
                end = start + file.metadata.row_group(g).num_rows
                lo, hi = max(start, first), min(end, last)
                if lo < hi:
                    out.append((s, g, lo - start, hi - start))
                start = end
        return out

    def _chunk(self, split: pa.Table, sides: list[pa.Table], labeled: bool = True) -> Chunk:
        chunk = table_chunk(split, self.sparse_fields, self.dense_names, self.extra_columns, self.lookup)
        for (path, _), t in zip(self._sides, sides, strict=True):
            chunk.extras.update({name: _numpy(t.column(name), f"{path} column {name}") for name in t.column_names})
        if len(self._sources) > 1:
            if not labeled:
                chunk.labels = np.zeros_like(chunk.labels)  # never read, and never handed on
            chunk.extras[LABELED] = np.full(len(chunk), float(labeled), np.float32)
        return chunk

    def _columns(self, file: pq.ParquetFile) -> list[str]:
        label = ["label"] if "label" in file.schema_arrow.names else []
        return [*label, *self.keys, *self.dense_names, *self.extra_columns]

    def _read(self, groups: list[tuple[int, int, int, int]]) -> Chunk:
        chunks = []
        for s, g, lo, hi in groups:
            _, file, labeled = self._sources[s]
            sides = [side.read_row_group(g).slice(lo, hi - lo) for _, side in self._sides] if s == 0 else []
            chunks.append(self._chunk(file.read_row_group(g, columns=self._columns(file)).slice(lo, hi - lo), sides,
                                      labeled))
        return Chunk.concat(chunks)

    def _empty(self) -> Chunk:
        """A chunk with every column and no rows (a rank's padding batches)."""
        return self._chunk(self._file.schema_arrow.empty_table().select(self._columns(self._file)),
                           [side.schema_arrow.empty_table() for _, side in self._sides])

    def chunks(self) -> Iterator[Chunk]:
        """This rank's rows, a window at a time (shuffled when asked)."""
        groups = self._row_groups()
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        if self.shuffle:
            groups = [groups[i] for i in rng.permutation(len(groups))]
        for i in range(0, len(groups), self.window):
            chunk = self._read(groups[i:i + self.window])
            yield chunk.take(rng.permutation(len(chunk))) if self.shuffle else chunk

    def __iter__(self) -> Iterator[Batch]:
        carry: Chunk | None = None
        produced = 0
        for chunk in self.chunks():
            if carry is not None:
                chunk = Chunk.concat([carry, chunk])
            full = len(chunk) // self.batch_size * self.batch_size
            for s in range(0, full, self.batch_size):
                yield self.to_batch(chunk.slice(s, s + self.batch_size))
                produced += 1
            carry = chunk.slice(full, len(chunk)) if full < len(chunk) else None
        if carry is not None:
            yield self.to_batch(carry)
            produced += 1
        while produced < len(self):  # ranks with fewer rows still take part in every step
            yield self.to_batch(self._empty())
            produced += 1

    def to_batch(self, chunk: Chunk) -> Batch:
        return make_batch(chunk, self.keys, self.batch_size)


def _numpy(col: pa.ChunkedArray | pa.Array, where: str) -> np.ndarray:
    """A numeric or fixed-size-list column as a ``[rows]`` or ``[rows, L]`` array."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        if col.null_count:
            raise ValueError(f"{where}: {col.null_count} null row(s)")
        return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type):
        return col.to_numpy(zero_copy_only=False)
    raise ValueError(f"{where}: an extra column holds numbers or fixed-size lists of numbers, not {col.type}")


def _aligned(path: Path, split: pq.ParquetFile, split_path: Path) -> tuple[Path, pq.ParquetFile]:
    """A Parquet file read row group by row group beside the split it is aligned with."""
    if not path.is_file():
        raise FileNotFoundError(f"side file {path} not found (it should be aligned with {split_path})")
    side = pq.ParquetFile(path)
    a = [split.metadata.row_group(g).num_rows for g in range(split.metadata.num_row_groups)]
    b = [side.metadata.row_group(g).num_rows for g in range(side.metadata.num_row_groups)]
    if a != b:
        raise ValueError(f"{path} is not aligned with {split_path}: its row groups hold {sum(b)} rows in {len(b)} "
                         f"groups, the split's {sum(a)} in {len(a)}; write it row group by row group from the split")
    return path, side


def table_chunk(t: pa.Table, sparse_fields: list[PreparedField], dense_names: list[str],
                extra_columns: list[str] = (), lookup: dict[str, np.ndarray] | None = None) -> Chunk:
    """Rows of a prepared table (ids) as numpy columns; without a ``label`` column the labels are 0."""
    sparse = []
    for f in sparse_fields:
        col = t.column(f.name)
        ids = col.to_numpy().astype(np.int64) if f.kind is FieldKind.CATEGORICAL else Lists.from_arrow(col)
        if lookup is not None:
            table = lookup[f.table]
            ids = table[ids] if isinstance(ids, np.ndarray) else Lists(ids.offsets, table[ids.values.astype(np.int64)])
        sparse.append(ids)
    dense = (np.stack([t.column(n).to_numpy().astype(np.float32) for n in dense_names], axis=1)
             if dense_names else np.zeros((t.num_rows, 0), dtype=np.float32))
    labels = (t.column("label").to_numpy().astype(np.float32) if "label" in t.column_names
              else np.zeros(t.num_rows, np.float32))
    return Chunk(labels, dense, sparse, {c: _numpy(t.column(c), f"column {c}") for c in extra_columns})


def make_batch(chunk: Chunk, keys: list[str], batch_size: int) -> Batch:
    """A Batch of exactly ``batch_size`` rows; rows past the chunk's end are padding with weight 0."""
    n, pad = len(chunk), batch_size - len(chunk)
    values, lengths = [], []
    for col in chunk.sparse:
        if isinstance(col, Lists):
            values.append(col.values)
            lengths.append(np.diff(col.offsets))
            if pad:
                lengths.append(np.zeros(pad, np.int64))
        else:
            values.append(col)
            lengths.append(np.ones(n, np.int64))
            if pad:
                values.append(np.full(pad, PAD_ID, np.int64))
                lengths.append(np.ones(pad, np.int64))
    kjt = KeyedJaggedTensor(
        keys=keys,
        values=torch.from_numpy(np.concatenate(values).astype(np.int64, copy=False)),
        lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32, copy=False)),
        stride=batch_size,
    )
    weights = np.zeros(batch_size, np.float32)
    weights[:n] = 1.0
    labels = np.zeros(batch_size, np.float32)
    labels[:n] = chunk.labels
    dense = np.zeros((batch_size, chunk.dense.shape[1]), np.float32)
    dense[:n] = chunk.dense
    extras = {}
    for name, values in chunk.extras.items():
        padded = np.zeros((batch_size, *values.shape[1:]), values.dtype)
        padded[:n] = values
        extras[name] = torch.from_numpy(padded)
    return Batch(dense_features=torch.from_numpy(dense), sparse_features=kjt,
                 labels=torch.from_numpy(labels), weights=torch.from_numpy(weights), extras=extras)
