"""DIN-style target attention over the raw history (Zhou et al., KDD 2018): the strong non-pre-trained
baseline of sequence methods such as SRP4CTR.

The candidate item's embedding weighs each earlier behaviour (its item and side-field embeddings summed, the
same inputs SRP4CTR's encoder reads) through DIN's activation unit; the weighted sum enters any backbone as one
extra field. No pre-training and no language model. The attention block is part of the served model, so
``recsys.serve.export`` (bare backbones) does not export it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from recsys.data.batch import Batch
from recsys.data.schema import PreparedSchema
from recsys.methods.registry import MethodSpec, register
from recsys.methods.srp4ctr import SequenceFields, sequence_fields
from recsys.models.base import Backbone, CTROutput
from recsys.modules.sequence import TargetAttention
from recsys.train.task import Task

if TYPE_CHECKING:
    from recsys.experiment import ExperimentConfig


@dataclass
class DINConfig:
    attention_hidden: int = 36  # the activation unit's hidden layer (DIN's default)


class DINTask(Task):
    def __init__(self, model: Backbone, fields: SequenceFields, item_index: int, cfg: DINConfig) -> None:
        super().__init__(model)
        self.fields, self.item_index = fields, item_index
        self.attention = TargetAttention(model.embedding_dim, cfg.attention_hidden)

    def output(self, batch: Batch) -> CTROutput:
        emb, seqs = self.model.sparse_arch.embed(batch)
        mask = seqs[self.fields.item_history][1]
        history = torch.stack([seqs[name][0] for name in self.fields.all]).sum(0)
        interest = self.attention(emb[:, self.item_index], history, mask)
        return self.model.from_embeddings(emb, batch, interest.unsqueeze(1))


def _build(schema: PreparedSchema, cfg: ExperimentConfig, device: torch.device | None) -> Task:
    fields = sequence_fields(schema)
    backbone = cfg.model.build(schema, device, num_extra_fields=1, sequence_fields=fields.all)
    return DINTask(backbone, fields, backbone.sparse_arch.sparse_names.index(fields.item), cfg.method.din)


def _check(cfg: ExperimentConfig, schema: PreparedSchema | None) -> None:
    if schema is not None:
        sequence_fields(schema)


SPEC = register(MethodSpec(name="din", summary="DIN target attention over the raw history (a sequence baseline)",
                           build=_build, section="din", config=DINConfig, check=_check))
