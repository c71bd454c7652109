"""The baseline: DeepFM in plain PyTorch (``nn.EmbeddingBag``, Adam on everything), same sizes as
``recsys.models.deepfm`` with the default config, fed the same ``Batch`` objects."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recsys.data.batch import Batch
from recsys.data.schema import PreparedSchema


class PlainDeepFM(nn.Module):
    def __init__(self, schema: PreparedSchema, dim: int = 16, hidden: tuple[int, ...] = (400, 400)) -> None:
        super().__init__()
        self.keys = [f.name for f in schema.sparse_fields]
        tables = {f.table: f.vocab_size for f in schema.sparse_fields}
        self.table_of = {f.name: f.table for f in schema.sparse_fields}
        self.emb = nn.ModuleDict({t: nn.EmbeddingBag(n, dim, mode="mean", include_last_offset=True) for t, n in tables.items()})
        self.lin = nn.ModuleDict({t: nn.EmbeddingBag(n, 1, mode="mean", include_last_offset=True) for t, n in tables.items()})
        layers, d = [], dim * len(self.keys)
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        self.dnn = nn.Sequential(*layers, nn.Linear(d, 1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, batch: Batch) -> torch.Tensor:
        per_key = batch.sparse_features.to_dict()
        embs, first = [], self.bias
        for k in self.keys:
            jt = per_key[k]
            t = self.table_of[k]
            embs.append(self.emb[t](jt.values(), jt.offsets()))
            first = first + self.lin[t](jt.values(), jt.offsets()).squeeze(-1)
        return first + self.dense(torch.stack(embs, dim=1))

    def dense(self, e: torch.Tensor) -> torch.Tensor:
        """The FM and DNN terms of the logit from the stacked field embeddings ``e`` [B, N, D]."""
        fm = 0.5 * (e.sum(1).pow(2) - e.pow(2).sum(1)).sum(1)
        return fm + self.dnn(e.flatten(1)).squeeze(-1)

    def loss(self, batch: Batch) -> torch.Tensor:
        logits = self.forward(batch)
        return F.binary_cross_entropy_with_logits(logits, batch.labels, weight=batch.weights, reduction="sum") \
            / batch.weights.sum().clamp(min=1.0)
