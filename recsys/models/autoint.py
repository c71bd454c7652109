"""AutoInt (Song et al., "AutoInt: Automatic Feature Interaction Learning via Self-Attentive Neural
Networks", CIKM 2019), and AutoInt+ with ``use_dnn=True``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from recsys.data.batch import Batch
from recsys.models.base import Backbone, CTROutput
from recsys.modules.embedding import SparseArch
from recsys.modules.interaction import MultiHeadSelfAttention
from recsys.modules.mlp import MLP


@dataclass(frozen=True)
class AutoIntConfig:
    num_layers: int = 3
    num_heads: int = 2
    attention_dim: int = 32  # per head (the paper's d')
    residual: bool = True
    use_dnn: bool = False  # AutoInt+: a DNN beside the attention layers
    dnn_hidden: tuple[int, ...] = (400, 400)
    dropout: float = 0.0  # the DNN's


class AutoInt(Backbone):
    """Stacked interacting layers over the fields, flattened into one output layer.

    ``representation`` is the flattened output of the last interacting layer, ``[B, N * heads * d']``,
    followed by the DNN's last hidden layer when ``use_dnn``: the paper's AutoInt+ adds the two logits,
    which is one linear layer over their concatenation.

    Example::

        device = torch.device("cpu")
        model = AutoInt(SparseArch(schema, 16, device), AutoIntConfig(), device=device)
        out = model(batch)  # out.logit [B], out.representation [B, N * 64]
    """

    def __init__(
        self,
        sparse_arch: SparseArch,
        config: AutoIntConfig,
        num_extra_fields: int = 0,
        device: torch.device | None = None,
    ) -> None:
        super().__init__(sparse_arch, num_extra_fields)
        device = device or torch.device("meta")
        self.config = config
        layers = []
        dim = self.embedding_dim
        for _ in range(config.num_layers):
            layers.append(MultiHeadSelfAttention(dim, config.attention_dim, config.num_heads, config.residual,
                                                 device=device))
            dim = layers[-1].output_dim
        self.attention = nn.Sequential(*layers)
        out_dim = self.num_fields * dim
        self.dnn = None
        if config.use_dnn:
            self.dnn = MLP(self.num_fields * self.embedding_dim, config.dnn_hidden, dropout=config.dropout,
                           device=device)
            out_dim += self.dnn.output_dim
        self.output_layer = nn.Linear(out_dim, 1, device=device)

    def interact(self, emb: torch.Tensor, batch: Batch) -> CTROutput:
        hidden = self.attention(emb).flatten(1)
        if self.dnn is not None:
            hidden = torch.cat([hidden, self.dnn(emb.flatten(1))], dim=-1)
        return CTROutput(logit=self.output_layer(hidden).squeeze(-1), representation=hidden, field_embeddings=emb)
