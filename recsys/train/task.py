"""Training wrappers: the loss lives here, not in the models (TorchRec's ``DLRMTrain`` style).

A task maps a batch to ``(loss, (loss, logits, labels, weights))``, the shape ``TrainPipelineSparseDist``
expects: it backpropagates the first element and hands the second back to the loop for metrics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recsys.data.batch import Batch
from recsys.models.base import Backbone, CTROutput

TaskOutput = tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def weighted_bce(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean binary cross-entropy over the real rows of a (possibly padded) batch."""
    loss = F.binary_cross_entropy_with_logits(logits, batch.labels, weight=batch.weights, reduction="sum")
    return loss / batch.weights.sum().clamp(min=1.0)


class CTRTask(nn.Module):
    """Binary cross-entropy on a backbone's logit.

    Example::

        task = CTRTask(build_backbone("deepfm", schema, 16, device=torch.device("cpu")))
        loss, (_, logits, labels, weights) = task(batch)
    """

    def __init__(self, model: Backbone) -> None:
        super().__init__()
        self.model = model

    def output(self, batch: Batch) -> CTROutput:
        """The backbone's whole output (a teacher's representation too)."""
        return self.model(batch)

    def score(self, batch: Batch) -> torch.Tensor:
        """The served logit."""
        return self.model(batch).logit

    def forward(self, batch: Batch) -> TaskOutput:
        logits = self.model(batch).logit
        loss = weighted_bce(logits, batch)
        return loss, (loss.detach(), logits.detach(), batch.labels, batch.weights)
