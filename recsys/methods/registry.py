"""Methods that wrap or extend any backbone. ``build_task`` turns an experiment into the module the one
trainer trains: a backbone inside a training wrapper that owns the loss.

``method.name`` picks the method: ``none`` (the plain backbone, BCE) or ``llactr``. Switching a backbone
to LLaCTR is one configuration change: ``method.name=llactr method.llactr.field_table=PATH``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from recsys.data.schema import PreparedSchema
from recsys.models import build_backbone
from recsys.models.base import Backbone
from recsys.train.config import ConfigError, ExperimentConfig
from recsys.train.task import CTRTask


def _plain(backbone: Backbone, schema: PreparedSchema, cfg: ExperimentConfig) -> nn.Module:
    return CTRTask(backbone)


def _llactr(backbone: Backbone, schema: PreparedSchema, cfg: ExperimentConfig) -> nn.Module:
    from recsys.features import load_feature_table
    from recsys.methods.llactr import LLaCTRTask

    table = load_feature_table(cfg.method.llactr.field_table, expect_fingerprint=schema.fingerprint,
                               expect_entity="field", num_rows=len(schema.fields))
    # the table is keyed by schema position; the sparse arch orders sparse fields before dense ones
    position = {f.name: i for i, f in enumerate(schema.fields)}
    order = [position[name] for name in backbone.sparse_arch.field_names]
    return LLaCTRTask(backbone, table.embeddings[order], cfg.method.llactr)


METHODS: dict[str, Callable[[Backbone, PreparedSchema, ExperimentConfig], nn.Module]] = {
    "none": _plain,
    "llactr": _llactr,
}


def check_method(cfg: ExperimentConfig) -> None:
    name = cfg.method.name
    if name not in METHODS:
        raise ConfigError(f"method.name {name!r} is unknown; choose from {sorted(METHODS)}")
    if name == "llactr" and not Path(cfg.method.llactr.field_table).exists():
        raise ConfigError(f"method.llactr.field_table={cfg.method.llactr.field_table!r} does not exist; make it "
                          "with `python -m embedding_jobs.run --entity field ...`")


def build_task(schema: PreparedSchema, cfg: ExperimentConfig, device: torch.device | None = None) -> nn.Module:
    """The training module for ``cfg``: backbone wrapped by its method. ``device=None`` builds the backbone on
    the meta device, for DistributedModelParallel to materialise and shard."""
    m = cfg.model
    backbone = build_backbone(m.backbone, schema, m.embedding_dim, m.backbone_config(), device=device)
    return METHODS[cfg.method.name](backbone, schema, cfg)
