"""AUC and logloss over all ranks' predictions (exact, not an average of per-rank values), overall and per
regime (warm, cold user, cold item, long tail) with GAUC."""

from __future__ import annotations

from typing import Any

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


# ------------------------------------------------------------------------------------------------
# Regimes: where language-model knowledge should pay (cold users and items, the long tail)
# ------------------------------------------------------------------------------------------------
LONG_TAIL = (1, 5)  # an item with this many training rows (inclusive) is in the long tail


def _metrics_or_note(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """AUC and logloss of some rows, or what makes them undefined (no rows; one class has no AUC)."""
    rows = int(labels.numel())
    if rows == 0:
        return {"rows": 0, "auc": None, "logloss": None, "note": "no rows"}
    positives = int(labels.sum().item())
    out: dict[str, Any] = {"rows": rows, "auc": None, "logloss": logloss(probs, labels), "positives": positives}
    if positives in (0, rows):
        out["note"] = "one class"
    else:
        out["auc"] = auc(probs, labels)
    return out


def gauc(probs: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> tuple[float | None, int]:
    """Group AUC: each group's (user's) AUC weighted by its rows; groups with one class are skipped.
    Returns the value (None if no group has both classes) and the number of groups counted."""
    order = torch.argsort(groups, stable=True)
    g, p, y = groups[order], probs[order], labels[order]
    _, counts = torch.unique_consecutive(g, return_counts=True)
    total = weight = 0.0
    used = 0
    for pg, yg in zip(torch.split(p, counts.tolist()), torch.split(y, counts.tolist()), strict=True):
        positives = yg.sum().item()
        if 0 < positives < yg.numel():
            total += auc(pg, yg) * yg.numel()
            weight += yg.numel()
            used += 1
    return (total / weight if weight else None), used


def regime_masks(user_rows: torch.Tensor | None, item_rows: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Which rows are in which regime, from the training-row counts of each row's user and item."""
    masks = {}
    if user_rows is not None and item_rows is not None:
        masks["warm"] = (user_rows > 0) & (item_rows > 0)
    if user_rows is not None:
        masks["cold_user"] = user_rows == 0
    if item_rows is not None:
        masks["cold_item"] = item_rows == 0
        masks["long_tail"] = (item_rows >= LONG_TAIL[0]) & (item_rows <= LONG_TAIL[1])
    return masks


def regime_metrics(probs: torch.Tensor, labels: torch.Tensor, user_rows: torch.Tensor | None,
                   item_rows: torch.Tensor | None, user_key: torch.Tensor | None) -> dict[str, Any]:
    """``{"regimes": {all, warm, cold_user, cold_item, long_tail: {rows, auc, logloss, ...}}, "gauc": ...,
    "gauc_users": ...}`` for the regimes the columns allow."""
    regimes = {"all": _metrics_or_note(probs, labels)}
    for name, mask in regime_masks(user_rows, item_rows).items():
        regimes[name] = _metrics_or_note(probs[mask], labels[mask])
    out: dict[str, Any] = {"regimes": regimes}
    if user_key is not None:
        out["gauc"], out["gauc_users"] = gauc(probs, labels, user_key)
    return out
