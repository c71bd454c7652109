"""Feature-interaction blocks over per-field embeddings ``[B, N, D]`` (or their flattening ``[B, N*D]``).

- :class:`FMInteraction`: the factorization machine's second-order term (Rendle, ICDM 2010).
- :class:`CrossNetV2`: DCN-V2's full-rank cross network (Wang et al., WWW 2021).
- :class:`MultiHeadSelfAttention`: AutoInt's interacting layer (Song et al., CIKM 2019).
- :class:`FeatureSelection`, :class:`InteractionAggregation`: FinalMLP's gate and two-stream fusion
  (Mao et al., AAAI 2023).

Wukong's blocks live in :mod:`recsys.modules.wukong`. Blocks take ``device`` as ``nn.Linear`` does
(``None``: PyTorch's default device). A block that owns an ``nn.Parameter`` itself defines
``reset_parameters``, which DistributedModelParallel calls when it materialises a ``meta`` module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from recsys.modules.mlp import MLP


class FMInteraction(nn.Module):
    """``0.5 * ((sum_i e_i)^2 - sum_i e_i^2)``: every pairwise inner product ``<e_i, e_j>``, i < j, in O(N D).

    Returns ``[B]`` (summed over D), or ``[B, D]`` per dimension with ``reduce=False``.

    Example::

        fm = FMInteraction()
        y = fm(torch.randn(8, 5, 16))  # [8]
    """

    def __init__(self, reduce: bool = True) -> None:
        super().__init__()
        self.reduce = reduce

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        total = emb.sum(dim=1)
        out = 0.5 * (total * total - (emb * emb).sum(dim=1))  # [B, D]
        return out.sum(dim=-1) if self.reduce else out


class CrossNetV2(nn.Module):
    """DCN-V2's cross network: ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l`` with full-rank ``W_l``.

    Example::

        cross = CrossNetV2(64, num_layers=3, device=torch.device("cpu"))
        y = cross(torch.randn(8, 64))  # [8, 64]
    """

    def __init__(self, input_dim: int, num_layers: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(input_dim, input_dim, device=device) for _ in range(num_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


class MultiHeadSelfAttention(nn.Module):
    """AutoInt's interacting layer: multi-head self-attention across fields, residual, then ReLU.

    Each head projects to ``head_dim``; the heads are concatenated, so a field leaves with
    ``num_heads * head_dim`` values. As in the paper the attention scores are plain inner products
    (no ``1/sqrt(d)`` scaling) and the residual goes through its own projection ``W_res``.

    Example::

        layer = MultiHeadSelfAttention(16, head_dim=32, num_heads=2, device=torch.device("cpu"))
        y = layer(torch.randn(8, 5, 16))  # [8, 5, 64]
    """

    def __init__(
        self,
        input_dim: int,
        head_dim: int,
        num_heads: int,
        residual: bool = True,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.num_heads = num_heads
        out = head_dim * num_heads
        self.query = nn.Linear(input_dim, out, bias=False, device=device)
        self.key = nn.Linear(input_dim, out, bias=False, device=device)
        self.value = nn.Linear(input_dim, out, bias=False, device=device)
        self.residual = nn.Linear(input_dim, out, bias=False, device=device) if residual else None

    @property
    def output_dim(self) -> int:
        return self.head_dim * self.num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, N, H*d] -> [B, H, N, d]
            return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)),
                                             scale=1.0)
        out = out.transpose(1, 2).reshape(b, n, self.output_dim)
        if self.residual is not None:
            out = out + self.residual(x)
        return torch.relu(out)


class FeatureSelection(nn.Module):
    """FinalMLP's stream-specific feature gate: ``x * 2 * sigmoid(MLP(context))``.

    The context is the embeddings of ``context_fields`` (indices into the N fields), or, when there are
    none, a learned vector, which makes the gate a learned per-dimension weighting of the input.

    Example::

        fs = FeatureSelection(5 * 16, context_fields=[1], embedding_dim=16, device=torch.device("cpu"))
        x = fs(torch.randn(8, 5, 16))  # [8, 80]: the flattened embeddings, gated
    """

    def __init__(
        self,
        input_dim: int,
        context_fields: Sequence[int],
        embedding_dim: int,
        hidden: Sequence[int] = (64,),
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.context_fields = list(context_fields)
        if self.context_fields:
            self.register_parameter("context_bias", None)
        else:
            self.context_bias = nn.Parameter(torch.empty(1, embedding_dim, device=device))
        self.gate = MLP(embedding_dim * max(1, len(self.context_fields)), hidden, device=device)
        self.gate_out = nn.Linear(self.gate.output_dim, input_dim, device=device)
        if not self.gate_out.weight.is_meta:  # on meta, whoever materialises the module initialises it
            self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.context_bias is not None:
            # Small noise rather than FuxiCTR's zeros: a zero context gives the gate's first weights no gradient.
            nn.init.normal_(self.context_bias, std=0.01)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        if self.context_bias is None:
            context = emb[:, self.context_fields].flatten(1)
        else:
            context = self.context_bias.expand(emb.shape[0], -1)
        return emb.flatten(1) * 2 * torch.sigmoid(self.gate_out(self.gate(context)))


class InteractionAggregation(nn.Module):
    """FinalMLP's multi-head bilinear fusion of two stream outputs ``x``, ``z`` into a logit.

    ``logit = b + w_x^T x + w_z^T z + sum_h x_h^T W_h z_h`` where ``x_h``, ``z_h`` are the h-th of
    ``num_heads`` equal chunks. It takes the concatenation ``[x, z]`` as one input, so that the
    backbone's ``representation`` is exactly this layer's input.

    Example::

        agg = InteractionAggregation(400, 400, num_heads=2, device=torch.device("cpu"))
        logit = agg(torch.randn(8, 800))  # [8]
    """

    def __init__(self, x_dim: int, z_dim: int, num_heads: int = 1, device: torch.device | None = None) -> None:
        super().__init__()
        if x_dim % num_heads or z_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide both stream widths ({x_dim}, {z_dim})")
        self.x_dim, self.z_dim, self.num_heads = x_dim, z_dim, num_heads
        self.linear = nn.Linear(x_dim + z_dim, 1, device=device)  # b + w_x^T x + w_z^T z in one layer
        self.bilinear = nn.Parameter(torch.empty(num_heads, x_dim // num_heads, z_dim // num_heads, device=device))
        if not self.bilinear.is_meta:  # on meta, whoever materialises the module initialises it
            self.reset_parameters()

    def reset_parameters(self) -> None:
        # FuxiCTR's init: Xavier normal of the weights seen as one [heads * x_h * z_h, 1] matrix.
        nn.init.normal_(self.bilinear, std=math.sqrt(2.0 / (self.bilinear.numel() + 1)))

    def forward(self, xz: torch.Tensor) -> torch.Tensor:
        x, z = xz.split([self.x_dim, self.z_dim], dim=-1)
        xh = x.reshape(x.shape[0], self.num_heads, -1)
        zh = z.reshape(z.shape[0], self.num_heads, -1)
        return self.linear(xz).squeeze(-1) + torch.einsum("bhi,hij,bhj->b", xh, self.bilinear, zh)
