"""Serving: export a trained model as a self-contained artifact, and score Parquet requests with it.

The artifact needs ``recsys`` (torch, torchrec, fbgemm) alone: no language model, no transformers or
vLLM, no feature tables. See :mod:`recsys.serve.artifact`.
"""

from recsys.serve.artifact import ExportedModel, export_run, load_exported

__all__ = ["ExportedModel", "export_run", "load_exported"]
