"""DeepFM (Guo et al., "DeepFM: A Factorization-Machine based Neural Network for CTR Prediction",
IJCAI 2017)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from recsys.data.batch import Batch
from recsys.models.base import Backbone, CTROutput
from recsys.modules.embedding import FirstOrderArch, SparseArch
from recsys.modules.interaction import FMInteraction
from recsys.modules.mlp import MLP


@dataclass(frozen=True)
class DeepFMConfig:
    hidden: tuple[int, ...] = (400, 400)  # the DNN's hidden layers
    dropout: float = 0.0
    batch_norm: bool = False


class DeepFM(Backbone):
    """An FM and a DNN over the same embeddings: ``logit = y_first_order + y_FM + output_layer(DNN(e))``.

    ``representation`` is the DNN's last hidden layer, the input of ``output_layer``; the FM terms are
    added to the logit after it, as in the paper. The first-order term covers the schema's fields.

    Example::

        device = torch.device("cpu")
        model = DeepFM(SparseArch(schema, 16, device), DeepFMConfig(), device=device,
                       first_order=FirstOrderArch(schema, device))
        out = model(batch)  # out.logit [B], out.representation [B, 400]
    """

    def __init__(
        self,
        sparse_arch: SparseArch,
        config: DeepFMConfig,
        num_extra_fields: int = 0,
        device: torch.device | None = None,
        *,
        first_order: FirstOrderArch,
    ) -> None:
        super().__init__(sparse_arch, num_extra_fields)
        device = device or torch.device("meta")
        self.config = config
        self.first_order = first_order
        self.fm = FMInteraction()
        self.dnn = MLP(self.num_fields * self.embedding_dim, config.hidden, batch_norm=config.batch_norm,
                       dropout=config.dropout, device=device)
        self.output_layer = nn.Linear(self.dnn.output_dim, 1, device=device)

    def interact(self, emb: torch.Tensor, batch: Batch) -> CTROutput:
        hidden = self.dnn(emb.flatten(1))
        logit = self.first_order(batch) + self.fm(emb) + self.output_layer(hidden).squeeze(-1)
        return CTROutput(logit=logit, representation=hidden, field_embeddings=emb)
