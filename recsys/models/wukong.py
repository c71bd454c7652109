"""Wukong (Zhang et al., "Wukong: Towards a Scaling Law for Large-Scale Recommendation", ICML 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from recsys.data.batch import Batch
from recsys.models.base import Backbone, CTROutput
from recsys.modules.embedding import SparseArch
from recsys.modules.mlp import MLP
from recsys.modules.wukong import WukongLayer


@dataclass(frozen=True)
class WukongConfig:
    # Defaults: the paper's public-dataset setting as reproduced by clabrugere/wukong-recommendation.
    num_layers: int = 3
    num_fmb: int = 16  # n_F: embeddings made by each factorization machine block
    num_lcb: int = 16  # n_L: embeddings made by each linear compression block
    rank: int = 24  # k: the optimised FM's projection rank
    fmb_hidden: tuple[int, ...] = (512,)  # the FMB MLP's hidden layers (then a layer to n_F * D)
    hidden: tuple[int, ...] = (512,)  # the top MLP's hidden layers (then the output layer)
    dropout: float = 0.0


class Wukong(Backbone):
    """An interaction stack of Wukong layers (FMB + LCB, residual, layer norm), then an MLP.

    ``representation`` is the top MLP's last hidden layer, the input of ``output_layer``.

    Example::

        device = torch.device("cpu")
        model = Wukong(SparseArch(schema, 16, device), WukongConfig(num_layers=2), device=device)
        out = model(batch)  # out.logit [B], out.representation [B, 512]
    """

    def __init__(
        self,
        sparse_arch: SparseArch,
        config: WukongConfig,
        num_extra_fields: int = 0,
        device: torch.device | None = None,
    ) -> None:
        super().__init__(sparse_arch, num_extra_fields)
        device = device or torch.device("meta")
        self.config = config
        layers = []
        num = self.num_fields
        for _ in range(config.num_layers):
            layers.append(WukongLayer(num, self.embedding_dim, config.num_fmb, config.num_lcb, config.rank,
                                      config.fmb_hidden, config.dropout, device=device))
            num = layers[-1].num_out
        self.interaction = nn.Sequential(*layers)
        self.mlp = MLP(num * self.embedding_dim, config.hidden, dropout=config.dropout, device=device)
        self.output_layer = nn.Linear(self.mlp.output_dim, 1, device=device)

    def interact(self, emb: torch.Tensor, batch: Batch) -> CTROutput:
        hidden = self.mlp(self.interaction(emb).flatten(1))
        return CTROutput(logit=self.output_layer(hidden).squeeze(-1), representation=hidden, field_embeddings=emb)
