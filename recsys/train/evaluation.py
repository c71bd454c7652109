"""Evaluators: what the trainer collects from a stage's validation steps, reduced over every rank.

The trainer calls ``update(step)`` with each step's output (a dict of tensors, padded rows carrying weight 0)
and ``compute()`` once, on every rank (it gathers). A CTR stage is judged by AUC and logloss over all ranks'
predictions; a pre-training stage by sums it reduces to ratios (for example masked-token loss and accuracy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from recsys.data.schema import ITEM_TRAIN_ROWS, USER_KEY, USER_TRAIN_ROWS
from recsys.train.metrics import auc as auc_of
from recsys.train.metrics import gather, logloss, regime_metrics


class Evaluator(Protocol):
    def update(self, step: dict[str, torch.Tensor]) -> None: ...

    def compute(self) -> dict[str, Any]: ...


class CTREvaluator:
    """Exact AUC and logloss over every rank's predictions (``logits``, ``labels``, ``weights`` of each step),
    and, when ``split_file`` has the regime columns, the same per regime (warm, cold user, cold item, long
    tail) and GAUC.

    Evaluation reads a split in file order: each rank a contiguous range, padding at its end, gathered rank
    by rank. So the gathered real rows are the file's rows in order, and the regime columns are read from
    the file beside them; the labels are compared to make sure.
    """

    def __init__(self, split_file: str | Path | None = None) -> None:
        self.split_file = Path(split_file) if split_file is not None else None
        self.logits: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []

    def update(self, step: dict[str, torch.Tensor]) -> None:
        self.logits.append(step["logits"])
        self.labels.append(step["labels"])
        self.weights.append(step["weights"])

    def compute(self) -> dict[str, Any]:
        logits, labels, weights = (gather(torch.cat(x).cpu()) for x in (self.logits, self.labels, self.weights))
        keep = weights > 0
        probs = torch.sigmoid(logits[keep].double())
        y = labels[keep].double()
        out: dict[str, Any] = {"auc": auc_of(probs, y), "logloss": logloss(probs, y), "rows": int(keep.sum()),
                               "positive_rate": float(y.mean()) if y.numel() else float("nan")}
        columns = self._regime_columns(y)
        if columns is not None:
            out.update(regime_metrics(probs, y, *columns))
        return out

    def _regime_columns(self, y: torch.Tensor) -> tuple[torch.Tensor | None, ...] | None:
        if self.split_file is None:
            return None
        names = pq.ParquetFile(self.split_file).schema_arrow.names
        wanted = [c for c in (USER_TRAIN_ROWS, ITEM_TRAIN_ROWS, USER_KEY) if c in names]
        if not wanted:
            return None  # prepared before regimes existed: overall metrics only
        t = pq.read_table(self.split_file, columns=["label", *wanted])
        if t.num_rows != y.numel() or not np.array_equal(t.column("label").to_numpy(), y.numpy().astype(np.float32)):
            raise RuntimeError(f"{self.split_file}: the evaluated rows are not the file's rows in order "
                               f"({y.numel()} evaluated, {t.num_rows} in the file); regimes cannot be matched")
        return tuple(torch.from_numpy(t.column(c).to_numpy().astype(np.int64)) if c in names else None
                     for c in (USER_TRAIN_ROWS, ITEM_TRAIN_ROWS, USER_KEY))


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
