"""Feature tables of made-up vectors for tests: real files in the real format, no language model."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from recsys.data.schema import FIRST_ID, PreparedSchema
from recsys.features.table import FIELD_TABLE, FeatureEntity, FeatureTableMetadata


def write_synthetic_table(path: Path, schema: PreparedSchema, entity: FeatureEntity, vectors: np.ndarray,
                          key_field: str = FIELD_TABLE, model_name: str = "test") -> Path:
    """Write ``vectors`` (one row per key of the entity's key space) as the table file ``path``.

    A field table is keyed 0..K-1; an id-keyed table (``key_field``, for example ``user_id``) stores ids from
    ``FIRST_ID`` on, as the writer of the real jobs does (padding and unknown have no vector).
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    first = 0 if entity is FeatureEntity.FIELD else FIRST_ID
    meta = FeatureTableMetadata(
        entity=entity, table=key_field, num_rows=len(vectors), dim=vectors.shape[1], model_name=model_name,
        weights_hash="0" * 64, engine="transformers", pooling="mean", normalize=False, max_length=32,
        dtype="float32", template_version=1, template_hash="t", dataset_name=schema.name,
        dataset_fingerprint=schema.fingerprint, created_at=datetime.now(UTC).isoformat())
    from embedding_jobs.table_writer import write_table_file

    write_table_file(path, np.arange(first, len(vectors), dtype=np.int64), vectors[first:], meta)
    return path


def random_method_tables(folder: Path, schema: PreparedSchema, seed: int = 0, dim: int = 8) -> dict[str, Path]:
    """A field table (LLaCTR) and user/item tables (ELEC) of seeded random vectors for ``schema``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"field": write_synthetic_table(folder / "field.parquet", schema, FeatureEntity.FIELD,
                                            rng.standard_normal((len(schema.fields), dim)))}
    for entity, key in ((FeatureEntity.USER, "user_id"), (FeatureEntity.ITEM, "item_id")):
        n = schema.field(key).vocab_size
        paths[str(entity)] = write_synthetic_table(folder / f"{entity}.parquet", schema, entity,
                                                   rng.standard_normal((n, dim)), key_field=key)
    return paths
