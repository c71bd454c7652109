"""DCN-V2 (Wang et al., "DCN V2: Improved Deep & Cross Network and Practical Lessons for Web-scale
Learning to Rank Systems", WWW 2021), full-rank cross layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from recsys.data.batch import Batch
from recsys.models.base import Backbone, CTROutput
from recsys.modules.embedding import SparseArch
from recsys.modules.interaction import CrossNetV2
from recsys.modules.mlp import MLP


@dataclass(frozen=True)
class DCNv2Config:
    num_cross_layers: int = 3
    hidden: tuple[int, ...] = (400, 400)  # the deep network's hidden layers
    structure: Literal["parallel", "stacked"] = "parallel"
    dropout: float = 0.0
    batch_norm: bool = False

    def __post_init__(self) -> None:
        if self.structure not in ("parallel", "stacked"):
            raise ValueError(f"DCNv2Config.structure must be 'parallel' or 'stacked', got {self.structure!r}")


class DCNv2(Backbone):
    """Cross network and deep network over the flattened embeddings ``x_0 = [e_1, ..., e_N]``.

    ``parallel``: ``output_layer([cross(x_0), deep(x_0)])``; ``stacked``: ``output_layer(deep(cross(x_0)))``.
    ``representation`` is the input of ``output_layer``.

    Example::

        device = torch.device("cpu")
        model = DCNv2(SparseArch(schema, 16, device), DCNv2Config(structure="stacked"), device=device)
        out = model(batch)  # out.logit [B], out.representation [B, 400]
    """

    def __init__(
        self,
        sparse_arch: SparseArch,
        config: DCNv2Config,
        num_extra_fields: int = 0,
        device: torch.device | None = None,
    ) -> None:
        super().__init__(sparse_arch, num_extra_fields)
        device = device or torch.device("meta")
        self.config = config
        self.parallel = config.structure == "parallel"
        input_dim = self.num_fields * self.embedding_dim
        self.cross = CrossNetV2(input_dim, config.num_cross_layers, device=device)
        self.deep = MLP(input_dim, config.hidden, batch_norm=config.batch_norm, dropout=config.dropout,
                        device=device)
        out_dim = input_dim + self.deep.output_dim if self.parallel else self.deep.output_dim
        self.output_layer = nn.Linear(out_dim, 1, device=device)

    def interact(self, emb: torch.Tensor, batch: Batch) -> CTROutput:
        x0 = emb.flatten(1)
        if self.parallel:
            hidden = torch.cat([self.cross(x0), self.deep(x0)], dim=-1)
        else:
            hidden = self.deep(self.cross(x0))
        return CTROutput(logit=self.output_layer(hidden).squeeze(-1), representation=hidden, field_embeddings=emb)
