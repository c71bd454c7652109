"""The feature-table format (DESIGN.md contract 2): what a table file holds and what its metadata says.

A feature table is Parquet with two columns, ``key: int64`` (an id in the prepared dataset's id space) and
``embedding: fixed_size_list<float32>[dim]`` (plain, not an extension type), and one schema-metadata key,
:data:`METADATA_KEY`, whose value is the JSON of :class:`FeatureTableMetadata`.

Key spaces, one per entity:

- ``field``: the field's position in the prepared ``schema.json`` (0..K-1); no reserved keys.
- ``feature``: one table per field that owns its vocabulary; key = the id in that vocabulary.
- ``user`` / ``item``: key = the id in the ``user_id`` / ``item_id`` vocabulary.
- ``history``: key = a 63-bit content hash of a behaviour history (SRP4CTR's cached encodings,
  ``recsys.methods.srp4ctr_cache``); not a language-model table, and not a dense key space.

In the id-keyed tables, ids 0 (padding) and 1 (unknown value) are reserved: the writer never stores them and
the reader gives them zero vectors, outside the missing count.

This module has no language-model imports: ``recsys`` stays importable without vLLM or transformers.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any

import pyarrow as pa

from recsys.data.schema import PAD_ID, UNK_ID

METADATA_KEY = b"llmctr.feature_table"
FORMAT_VERSION = 1
KEY_COLUMN = "key"
EMBEDDING_COLUMN = "embedding"
FIELD_TABLE = "field"  # the ``table`` of a field-entity table: keys are positions in schema.json

# A table folder, as the offline jobs write it: part files (one per unit of work, written atomically), a
# manifest with the plan, and the merged table once every part is done.
MERGED_FILE = "table.parquet"
PARTS_DIR = "parts"
PART_GLOB = "part-*.parquet"
MANIFEST_FILE = "manifest.json"


class FeatureTableError(ValueError):
    """A feature table that cannot be used; the message names the file and what is wrong."""


class FeatureEntity(StrEnum):
    FIELD = "field"
    FEATURE = "feature"
    USER = "user"
    ITEM = "item"
    HISTORY = "history"  # a sequence encoder's output per behaviour history, keyed by the history's hash


TEXT_ENTITIES = (FeatureEntity.FIELD, FeatureEntity.FEATURE, FeatureEntity.USER, FeatureEntity.ITEM)  # LM jobs


def reserved_keys(entity: FeatureEntity) -> tuple[int, ...]:
    """Keys a table of ``entity`` never stores: padding and unknown in vocabulary id spaces."""
    return () if entity in (FeatureEntity.FIELD, FeatureEntity.HISTORY) else (PAD_ID, UNK_ID)


@dataclass(frozen=True)
class FeatureTableMetadata:
    """Everything needed to tell whether a table fits a trainer: what was embedded, how, and from what."""

    entity: FeatureEntity
    table: str  # what the keys index: "field", or the prepared vocabulary (user_id, item_id, genres, ...)
    num_rows: int  # size of the key space: number of fields, or the vocabulary size
    dim: int
    model_name: str
    weights_hash: str  # sha256 over the model's weight files
    engine: str  # vllm or transformers
    pooling: str  # mean, last or cls
    normalize: bool  # L2-normalised vectors
    max_length: int  # tokens; longer texts were truncated
    dtype: str
    template_version: int
    template_hash: str
    dataset_name: str
    dataset_fingerprint: str
    created_at: str  # ISO 8601, UTC
    template_options: dict[str, Any] = field(default_factory=dict)
    model_path: str = ""  # where the model was read from (provenance only; not compared)
    # What the vector is: "" the pooled language-model state; "elec_transform" ELEC's transformation MLP on the
    # mean-pooled state, T(meanpool(H)) (embedding_jobs.ctr_adapt). Tables written before this field read as "".
    head: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def reserved_keys(self) -> tuple[int, ...]:
        return reserved_keys(self.entity)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> FeatureTableMetadata:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FeatureTableError(f"{where}: metadata {METADATA_KEY.decode()!r} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise FeatureTableError(f"{where}: metadata {METADATA_KEY.decode()!r} must be a JSON object")
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        absent = sorted(required - set(data))
        if absent:
            raise FeatureTableError(f"{where}: metadata lacks {absent}")
        unknown = sorted(set(data) - known)
        if unknown:
            raise FeatureTableError(f"{where}: metadata has unknown keys {unknown} (written by a newer version?)")
        if data.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise FeatureTableError(f"{where}: format_version {data['format_version']} is not supported "
                                    f"(this reader reads version {FORMAT_VERSION})")
        try:
            data["entity"] = FeatureEntity(data["entity"])
        except ValueError:
            raise FeatureTableError(f"{where}: metadata entity {data['entity']!r} is not one of "
                                    f"{[e.value for e in FeatureEntity]}") from None
        return cls(**data)

    def arrow_schema(self) -> pa.Schema:
        return table_schema(self.dim).with_metadata({METADATA_KEY: self.to_json().encode()})

    def differences(self, other: FeatureTableMetadata, ignore: tuple[str, ...] = ()) -> list[str]:
        """Names of the fields whose values differ, in declaration order."""
        return [f.name for f in fields(self) if f.name not in ignore
                and getattr(self, f.name) != getattr(other, f.name)]


def table_schema(dim: int) -> pa.Schema:
    """The Arrow schema every table file has (metadata aside)."""
    return pa.schema([pa.field(KEY_COLUMN, pa.int64(), nullable=False),
                      pa.field(EMBEDDING_COLUMN, pa.list_(pa.float32(), dim), nullable=False)])


__all__ = ["METADATA_KEY", "FORMAT_VERSION", "KEY_COLUMN", "EMBEDDING_COLUMN", "FIELD_TABLE", "MERGED_FILE",
           "PARTS_DIR", "PART_GLOB", "MANIFEST_FILE", "FeatureTableError",
           "FeatureEntity", "FeatureTableMetadata", "TEXT_ENTITIES", "reserved_keys", "table_schema"]
