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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.batch import Batch
from recsys.data.lists import Lists
from recsys.data.schema import PAD_ID, FieldKind, PreparedField, PreparedSchema


@dataclass
class Chunk:
    """Some rows of a split as numpy columns."""

    labels: np.ndarray
    dense: np.ndarray  # [rows, num_dense]
    sparse: list[np.ndarray | Lists]  # per sparse field: ids (single-valued) or Lists

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray) -> Chunk:
        return Chunk(self.labels[idx], self.dense[idx],
                     [c.take(idx) if isinstance(c, Lists) else c[idx] for c in self.sparse])

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
        return Chunk(np.concatenate([c.labels for c in chunks]), np.concatenate([c.dense for c in chunks]), sparse)


class ParquetBatches:
    """One rank's batches of one split of a prepared dataset."""

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
        missing = [f.name for f in schema.fields if f.name not in self._file.schema_arrow.names]
        if missing:
            raise ValueError(f"{self.path} lacks the columns {missing} that its schema.json lists")
        self.keys = [f.name for f in self.sparse_fields]
        n = self._file.metadata.num_rows
        self.num_rows = n
        self.lo, self.hi = rank * n // world_size, (rank + 1) * n // world_size
        self._rows_per_rank_max = math.ceil(n / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self._rows_per_rank_max / self.batch_size)

    # ------------------------------------------------------------------------------------------
    def _row_groups(self) -> list[tuple[int, int, int]]:
        """(row group, first row to keep, end row) within this rank's range."""
        out, start = [], 0
        meta = self._file.metadata
        for g in range(meta.num_row_groups):
            end = start + meta.row_group(g).num_rows
            lo, hi = max(start, self.lo), min(end, self.hi)
            if lo < hi:
                out.append((g, lo - start, hi - start))
            start = end
        return out

    def _read(self, groups: list[tuple[int, int, int]]) -> Chunk:
        columns = ["label", *self.keys, *self.dense_names]
        return Chunk.concat([table_chunk(self._file.read_row_group(g, columns=columns).slice(lo, hi - lo),
                                         self.sparse_fields, self.dense_names) for g, lo, hi in groups])

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
            yield self.to_batch(Chunk(np.zeros(0, np.float32), np.zeros((0, len(self.dense_names)), np.float32),
                                      [Lists(np.zeros(1, np.int64), np.zeros(0, np.int64))
                                       if f.kind is not FieldKind.CATEGORICAL else np.zeros(0, np.int64)
                                       for f in self.sparse_fields]))
            produced += 1

    def to_batch(self, chunk: Chunk) -> Batch:
        return make_batch(chunk, self.keys, self.batch_size)


def table_chunk(t: pa.Table, sparse_fields: list[PreparedField], dense_names: list[str]) -> Chunk:
    """Rows of a prepared table (ids) as numpy columns; without a ``label`` column the labels are 0."""
    sparse = []
    for f in sparse_fields:
        col = t.column(f.name)
        sparse.append(col.to_numpy().astype(np.int64) if f.kind is FieldKind.CATEGORICAL else Lists.from_arrow(col))
    dense = (np.stack([t.column(n).to_numpy().astype(np.float32) for n in dense_names], axis=1)
             if dense_names else np.zeros((t.num_rows, 0), dtype=np.float32))
    labels = (t.column("label").to_numpy().astype(np.float32) if "label" in t.column_names
              else np.zeros(t.num_rows, np.float32))
    return Chunk(labels, dense, sparse)


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
    return Batch(dense_features=torch.from_numpy(dense), sparse_features=kjt,
                 labels=torch.from_numpy(labels), weights=torch.from_numpy(weights))
