"""Blocks over behaviour sequences ``[B, L, D]`` with a mask ``[B, L]`` (True at real positions).

- :class:`SequenceEncoder`: a bidirectional transformer over the positions (FG-BERT style: each position the sum
  of its item, side-field and position embeddings).
- :class:`TargetAttention`: DIN's activation unit (Zhou et al., KDD 2018): a weight per position from an MLP
  over (target, position, target - position, target * position), then the weighted sum.
- :class:`CrossAttention`: the target as the query, the sequence as keys and values (multi-head).
- :class:`QFormer`: K learnable queries that read the sequence through a few layers of self-attention among
  themselves and cross-attention to it (BLIP-2's querying transformer), giving K vectors for any sequence.

Every block accepts sequences with no real position (a user with no history): they give zeros.
"""

from __future__ import annotations

import torch
from torch import nn


def _safe_padding(mask: torch.Tensor) -> torch.Tensor:
    """``key_padding_mask`` for attention (True = ignore), with one position kept for an empty sequence so that
    softmax stays finite; the caller zeroes those rows' outputs."""
    pad = ~mask
    empty = ~mask.any(dim=1, keepdim=True)
    first = torch.zeros_like(pad)
    first[:, 0] = True
    return pad & ~(empty & first)


class SequenceEncoder(nn.Module):
    """Bidirectional transformer over ``inputs`` [B, L, D] (already the sum of each position's embeddings)."""

    def __init__(self, dim: int, max_length: int, layers: int = 2, heads: int = 2, dropout: float = 0.1,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.position = nn.Parameter(torch.randn(max_length, dim, device=device) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=dropout, batch_first=True,
                                           device=device)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim, device=device)

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm(inputs + self.position[: inputs.shape[1]])
        out = self.encoder(x, src_key_padding_mask=_safe_padding(mask))
        return out * mask.unsqueeze(-1)


class TargetAttention(nn.Module):
    """DIN's target attention: ``sum_l a(target, e_l) e_l`` over real positions (no softmax, as in DIN)."""

    def __init__(self, dim: int, hidden: int = 36, device: torch.device | None = None) -> None:
        super().__init__()
        self.unit = nn.Sequential(nn.Linear(4 * dim, hidden, device=device), nn.Sigmoid(),
                                  nn.Linear(hidden, 1, device=device))

    def forward(self, target: torch.Tensor, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = target.unsqueeze(1).expand_as(seq)
        weights = self.unit(torch.cat([t, seq, t - seq, t * seq], dim=-1)).squeeze(-1) * mask
        return (weights.unsqueeze(-1) * seq).sum(dim=1)


class CrossAttention(nn.Module):
    """The target [B, D] attends to the sequence [B, L, D]; returns [B, D] (zeros for an empty sequence)."""

    def __init__(self, dim: int, heads: int = 2, device: torch.device | None = None) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True, device=device)
        self.norm = nn.LayerNorm(dim, device=device)

    def forward(self, target: torch.Tensor, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out, _ = self.attention(target.unsqueeze(1), seq, seq, key_padding_mask=_safe_padding(mask),
                                need_weights=False)
        return self.norm(out.squeeze(1)) * mask.any(dim=1, keepdim=True)


class QFormer(nn.Module):
    """K learnable queries read the sequence: ``layers`` x (self-attention among the queries, cross-attention
    to the sequence, feed-forward), each with a residual and a norm. Returns [B, K, D]."""

    def __init__(self, dim: int, queries: int, layers: int = 2, heads: int = 2,
                 device: torch.device | None = None) -> None:
        super().__init__()
        if queries < 1:
            raise ValueError(f"a Q-Former needs at least one query, got {queries}")
        self.queries = nn.Parameter(torch.randn(queries, dim, device=device) * 0.02)
        self.self_attn = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=True, device=device)
                                       for _ in range(layers))
        self.cross_attn = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=True, device=device)
                                        for _ in range(layers))
        self.ffn = nn.ModuleList(nn.Sequential(nn.Linear(dim, 4 * dim, device=device), nn.GELU(),
                                               nn.Linear(4 * dim, dim, device=device)) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim, device=device) for _ in range(3 * layers))

    def forward(self, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.queries.unsqueeze(0).expand(seq.shape[0], -1, -1)
        padding = _safe_padding(mask)
        for i, (sa, ca, ffn) in enumerate(zip(self.self_attn, self.cross_attn, self.ffn, strict=True)):
            q = self.norms[3 * i](q + sa(q, q, q, need_weights=False)[0])
            q = self.norms[3 * i + 1](q + ca(q, seq, seq, key_padding_mask=padding, need_weights=False)[0])
            q = self.norms[3 * i + 2](q + ffn(q))
        return q * mask.any(dim=1).view(-1, 1, 1)
