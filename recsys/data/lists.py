"""Jagged columns as two numpy arrays, for fast gathers without Python objects per row."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass
class Lists:
    """A jagged column as numpy: row i holds values[offsets[i]:offsets[i+1]]."""

    offsets: np.ndarray
    values: np.ndarray

    def take(self, idx: np.ndarray) -> Lists:
        starts = self.offsets[idx]
        lengths = self.offsets[idx + 1] - starts
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
        return Lists(offsets, self.values[flat])

    def capped(self, max_length: int | None, keep: str = "first") -> Lists:
        if max_length is None:
            return self
        lengths = np.diff(self.offsets)
        if lengths.size == 0 or lengths.max(initial=0) <= max_length:
            return self
        starts = self.offsets[:-1] if keep == "first" else self.offsets[1:] - np.minimum(lengths, max_length)
        return Lists(self.offsets, self.values).take_ranges(starts, np.minimum(lengths, max_length))

    def take_ranges(self, starts: np.ndarray, lengths: np.ndarray) -> Lists:
        offsets = np.zeros(len(starts) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
        return Lists(offsets, self.values[flat])

    def to_arrow(self) -> pa.ListArray:
        return pa.ListArray.from_arrays(pa.array(self.offsets.astype(np.int32)), pa.array(self.values))

    @classmethod
    def from_arrow(cls, array: pa.ListArray | pa.ChunkedArray) -> Lists:
        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks()
        offsets = array.offsets.to_numpy().astype(np.int64)
        values = array.values.to_numpy(zero_copy_only=False)
        return cls(offsets - offsets[0], values[offsets[0]:offsets[-1]])

    def __len__(self) -> int:
        return len(self.offsets) - 1
