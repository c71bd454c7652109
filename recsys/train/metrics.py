"""AUC and logloss over all ranks' predictions (exact, not an average of per-rank values)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U), ties given their average rank."""
    scores, labels = scores.double().flatten(), labels.double().flatten()
    n_pos = labels.sum().item()
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    sorted_scores, order = torch.sort(scores)
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg_rank = ends - (counts.double() - 1) / 2  # 1-based average rank of each run of ties
    rank_sum = avg_rank[inverse][labels[order] > 0.5].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def logloss(probs: torch.Tensor, labels: torch.Tensor, eps: float = 1e-7) -> float:
    p = probs.double().clamp(eps, 1 - eps)
    y = labels.double()
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())


def gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor of the same shape from every rank (identity without a process group)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def evaluate_predictions(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> dict[str, float]:
    """Global metrics from this rank's padded predictions; padding rows (weight 0) are dropped."""
    logits, labels, weights = gather(logits), gather(labels), gather(weights)
    keep = weights > 0
    probs = torch.sigmoid(logits[keep].double())
    y = labels[keep]
    return {"auc": auc(probs, y), "logloss": logloss(probs, y), "rows": int(keep.sum())}
