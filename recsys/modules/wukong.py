"""Wukong's interaction layer (Zhang et al., "Wukong: Towards a Scaling Law for Large-Scale
Recommendation", ICML 2024): a factorization machine block and a linear compression block side by side,
joined by a residual connection and a layer norm. Blocks map ``[B, n_in, D]`` to ``[B, n_out, D]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from recsys.modules.mlp import MLP


def _across_fields(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply ``linear`` along the field axis: ``[B, n_in, D] -> [B, n_out, D]``."""
    return linear(x.transpose(1, 2)).transpose(1, 2)


class LinearCompressBlock(nn.Module):
    """LCB: ``W_L X``, new embeddings that are linear mixtures of the input ones (no interaction).

    Example::

        lcb = LinearCompressBlock(5, 16, device=torch.device("cpu"))
        y = lcb(torch.randn(8, 5, 16))  # [8, 16, 16]
    """

    def __init__(self, num_in: int, num_out: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.mix = nn.Linear(num_in, num_out, bias=False, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _across_fields(self.mix, x)


class FactorizationMachineBlock(nn.Module):
    """FMB: ``reshape(MLP(LN(flatten(X X^T Y))))``, pairwise dot products turned into ``num_out`` embeddings.

    ``Y`` (``[n_in, rank]``) is the paper's optimised FM: it projects the ``n_in x n_in`` interaction
    matrix to ``n_in x rank`` without ever forming it.

    Example::

        fmb = FactorizationMachineBlock(5, 16, embedding_dim=16, rank=24, device=torch.device("cpu"))
        y = fmb(torch.randn(8, 5, 16))  # [8, 16, 16]
    """

    def __init__(
        self,
        num_in: int,
        num_out: int,
        embedding_dim: int,
        rank: int,
        hidden: Sequence[int] = (512,),
        dropout: float = 0.0,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.num_out, self.embedding_dim = num_out, embedding_dim
        self.project = nn.Linear(num_in, rank, bias=False, device=device)  # Y
        self.norm = nn.LayerNorm(num_in * rank, device=device)
        self.mlp = MLP(num_in * rank, hidden, dropout=dropout, device=device)
        self.out = nn.Linear(self.mlp.output_dim, num_out * embedding_dim, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fm = torch.bmm(x, self.project(x.transpose(1, 2)))  # X (X^T Y): [B, n_in, rank]
        out = self.out(self.mlp(self.norm(fm.flatten(1))))
        return out.view(-1, self.num_out, self.embedding_dim)


class WukongLayer(nn.Module):
    """``X_{l+1} = LN(concat(FMB(X_l), LCB(X_l)) + X_l)``, the residual projected when the counts differ.

    Example::

        layer = WukongLayer(5, 16, num_fmb=16, num_lcb=16, rank=24, device=torch.device("cpu"))
        y = layer(torch.randn(8, 5, 16))  # [8, 32, 16]
    """

    def __init__(
        self,
        num_in: int,
        embedding_dim: int,
        num_fmb: int,
        num_lcb: int,
        rank: int,
        fmb_hidden: Sequence[int] = (512,),
        dropout: float = 0.0,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.num_out = num_fmb + num_lcb
        self.fmb = FactorizationMachineBlock(num_in, num_fmb, embedding_dim, rank, fmb_hidden, dropout, device)
        self.lcb = LinearCompressBlock(num_in, num_lcb, device)
        self.residual = (nn.Identity() if num_in == self.num_out
                         else nn.Linear(num_in, self.num_out, bias=False, device=device))
        self.norm = nn.LayerNorm(embedding_dim, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([self.fmb(x), self.lcb(x)], dim=1)
        return self.norm(out + _across_fields(self.residual, x))
