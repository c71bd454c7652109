"""The language-model side: offline jobs that turn a prepared dataset into Parquet feature tables.

- ``templates``: versioned text templates (field, feature, user, item) over the prepared vocabularies;
- ``engines``: the ``Engine`` interface with ``TransformersEngine`` and ``VLLMEngine`` (vLLM imported lazily);
- ``model_files``: local model folders, weight hashes, pooling defaults (no hub: the machine is offline);
- ``table_writer``: crash-safe part files, manifest and merge (DESIGN.md contract 2);
- ``jobs`` / ``run``: the job and its CLI, ``python -m embedding_jobs.run --help``.

Read the tables with ``recsys.features.load_feature_table``.
"""
