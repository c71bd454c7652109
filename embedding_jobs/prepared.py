"""Read access to a prepared dataset (DESIGN.md contract 1) for the text side: raw values, never ids."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.data.schema import PreparedField, PreparedSchema
from recsys.data.sources import DataError

SPLITS = ("train", "valid", "test")


@dataclass
class PreparedData:
    """A prepared dataset folder: its schema, its vocabularies (as readable text) and its splits."""

    folder: Path
    schema: PreparedSchema
    _vocab_cache: dict[str, list[str]] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, folder: str | Path) -> PreparedData:
        folder = Path(folder)
        return cls(folder, PreparedSchema.load(folder))

    def field(self, name: str) -> PreparedField:
        try:
            return self.schema.field(name)
        except KeyError as e:
            raise DataError(f"{self.folder}: {e.args[0]}") from None

    def vocab_text(self, f: PreparedField) -> list[str]:
        """The readable value of every id of ``f``'s vocabulary: its ``text`` column where the vocabulary has
        one (codes such as occupation numbers), else its raw ``value``."""
        if f.vocab_file is None:
            raise DataError(f"{self.folder}: field {f.name!r} ({f.kind}) has no vocabulary")
        if f.table not in self._vocab_cache:
            path = self.folder / f.vocab_file
            try:
                table = pq.read_table(path)
            except (OSError, pa.ArrowException) as e:
                raise DataError(f"{path}: cannot read the vocabulary of field {f.name!r}: {e}") from None
            column = "text" if "text" in table.column_names else "value"
            if "id" not in table.column_names or column not in table.column_names:
                raise DataError(f"{path}: a vocabulary needs columns 'id' and 'value', has {table.column_names}")
            ids = table.column("id").to_numpy()
            if not np.array_equal(ids, np.arange(len(ids))) or len(ids) != f.vocab_size:
                raise DataError(f"{path}: ids must be 0..{f.vocab_size - 1} in order (vocab_size in schema.json)")
            self._vocab_cache[f.table] = [str(v) for v in table.column(column).to_pylist()]
        return self._vocab_cache[f.table]

    def read_split(self, split: str, columns: list[str]) -> pa.Table:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        path = self.folder / f"{split}.parquet"
        try:
            available = pq.read_schema(path).names
            absent = [c for c in columns if c not in available]
            if absent:
                raise DataError(f"{path}: no column(s) {absent}; columns are {available}")
            return pq.read_table(path, columns=columns)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: cannot read: {e}") from None

    def has_column(self, split: str, column: str) -> bool:
        return column in pq.read_schema(self.folder / f"{split}.parquet").names
