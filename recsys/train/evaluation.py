"""Evaluators: what the trainer collects from a stage's validation steps, reduced over every rank.

The trainer calls ``update(step)`` with each step's output (a dict of tensors, padded rows carrying weight 0)
and ``compute()`` once, on every rank (it gathers). A CTR stage is judged by AUC and logloss over all ranks'
predictions; a pre-training stage by sums it reduces to ratios (for example masked-token loss and accuracy).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist

from recsys.train.metrics import evaluate_predictions


class Evaluator(Protocol):
    def update(self, step: dict[str, torch.Tensor]) -> None: ...

    def compute(self) -> dict[str, float]: ...


class CTREvaluator:
    """Exact AUC and logloss over every rank's predictions (``logits``, ``labels``, ``weights`` of each step)."""

    def __init__(self) -> None:
        self.logits: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []

    def update(self, step: dict[str, torch.Tensor]) -> None:
        self.logits.append(step["logits"])
        self.labels.append(step["labels"])
        self.weights.append(step["weights"])

    def compute(self) -> dict[str, float]:
        return evaluate_predictions(torch.cat(self.logits).float().cpu(), torch.cat(self.labels).cpu(),
                                    torch.cat(self.weights).cpu())


class RatioEvaluator:
    """Metrics that are ratios of sums over all steps and ranks: ``{metric: (numerator key, denominator key)}``.

    Example: ``RatioEvaluator({"mlm_loss": ("loss_sum", "tokens"), "accuracy": ("correct", "tokens")})``.
    """

    def __init__(self, ratios: dict[str, tuple[str, str]]) -> None:
        self.ratios = ratios
        self.keys = sorted({k for pair in ratios.values() for k in pair})
        self.sums = torch.zeros(len(self.keys), dtype=torch.float64)

    def update(self, step: dict[str, torch.Tensor]) -> None:
        self.sums += torch.stack([step[k].detach().double().sum().cpu() for k in self.keys])

    def compute(self) -> dict[str, float]:
        sums = self.sums.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        total = dict(zip(self.keys, sums.tolist(), strict=True))
        return {name: (total[num] / total[den] if total[den] else float("nan"))
                for name, (num, den) in self.ratios.items()}
