"""LLM feature tables (DESIGN.md contract 2): the format, and a reader that aligns them to prepared ids.

No language-model imports here: the offline jobs in ``embedding_jobs`` write the tables, trainers read them.
"""

from recsys.features.reader import FeatureTable, load_feature_table, read_file, read_metadata, table_files
from recsys.features.table import (
    EMBEDDING_COLUMN,
    FIELD_TABLE,
    KEY_COLUMN,
    METADATA_KEY,
    FeatureEntity,
    FeatureTableError,
    FeatureTableMetadata,
    reserved_keys,
    table_schema,
)

__all__ = [
    "EMBEDDING_COLUMN", "FIELD_TABLE", "KEY_COLUMN", "METADATA_KEY", "FeatureEntity", "FeatureTable",
    "FeatureTableError", "FeatureTableMetadata", "load_feature_table", "read_file", "read_metadata",
    "reserved_keys", "table_files", "table_schema",
]
