"""The task protocol: what the one trainer trains. The loss lives here, not in the models (TorchRec's
``DLRMTrain`` style), and ``recsys.train`` knows this protocol and no method.

A task is an ``nn.Module`` around a backbone (``self.model``). Its ``forward(batch)`` returns
``(loss, step)``, the shape ``TrainPipelineSparseDist`` expects: it backpropagates ``loss`` and hands
``step`` (a dict of detached tensors: at least ``loss`` and the row ``weights``) back to the loop, which
passes it to the stage's :class:`Evaluator`. A method subclasses :class:`Task` and overrides hooks:

- ``output(batch)``: the whole CTR output (a teacher's representation too); ``score(batch)``: the served logit;
- ``extra_losses(batch, out)``: named ``(weight, per-row values)`` terms added to the BCE;
- ``stages``: the stages one experiment runs in order (pre-training, then fine-tuning), each with the metric
  it monitors; ``stage_forward`` computes a non-CTR stage's loss;
- ``param_groups()``: dense parameters that learn with their own optimizer, rate and schedule;
- ``warm_start()``: parts of the model loaded from other runs' checkpoints before training;
- ``extra_columns`` and ``side_files(split)``: per-row inputs beyond the fields (``Batch.extras``).

Example (a method whose task adds an L2 penalty on the field embeddings)::

    class L2Task(Task):
        def extra_losses(self, batch, out):
            return {"l2": (1e-4, out.field_embeddings.pow(2).sum((1, 2)))}

    loss, step = L2Task(build_backbone("deepfm", schema, 16, device=torch.device("cpu")))(batch)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from recsys.data.batch import LABELED, Batch
from recsys.models.base import Backbone, CTROutput
from recsys.train.evaluation import CTREvaluator, Evaluator

StepOutput = dict[str, torch.Tensor]
TaskOutput = tuple[torch.Tensor, StepOutput]


@dataclass(frozen=True)
class Stage:
    """One stage of an experiment: trained until its monitored validation metric stops improving.

    ``kind="ctr"`` stages are trained with the task's CTR loss and judged by AUC; any other stage's loss is
    the task's ``stage_forward`` and its evaluator the task's ``evaluator(stage)``.
    """

    name: str = "ctr"
    monitor: str = "auc"  # the validation metric that picks the best epoch and stops the stage early
    mode: Literal["max", "min"] = "max"
    kind: Literal["ctr", "pretrain"] = "ctr"

    def better(self, value: float, best: float) -> bool:
        return value > best if self.mode == "max" else value < best

    @property
    def worst(self) -> float:
        return -float("inf") if self.mode == "max" else float("inf")


CTR_STAGE = Stage()


@dataclass(frozen=True)
class ParamGroup:
    """Dense parameters (by name prefix inside the task) that learn with their own settings.

    Settings left ``None`` come from ``optim.groups.<name>`` or else the ``optim.dense_*`` defaults; dense
    parameters of no group form the default group ``dense``.
    """

    name: str
    prefixes: tuple[str, ...]
    optimizer: str | None = None
    lr: float | None = None
    weight_decay: float | None = None
    schedule: Literal["constant", "linear", "cosine"] | None = None
    warmup_steps: int | None = None


def labeled_weights(batch: Batch) -> torch.Tensor:
    """1 for a real row whose label counts; 0 for padding and for unlabeled rows (``data.unlabeled_splits``)."""
    labeled = batch.extras.get(LABELED)
    return batch.weights if labeled is None else batch.weights * labeled


def weighted_bce(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean binary cross-entropy over the real, labeled rows of a (possibly padded) batch."""
    weights = labeled_weights(batch)
    loss = F.binary_cross_entropy_with_logits(logits, batch.labels, weight=weights, reduction="sum")
    return loss / weights.sum().clamp(min=1.0)


def weighted_mean(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean of per-row ``values`` over the real rows of a (possibly padded) batch."""
    return (values * batch.weights).sum() / batch.weights.sum().clamp(min=1.0)


class Task(nn.Module):
    """Binary cross-entropy on a backbone's logit, plus whatever a method adds through the hooks.

    Used as is, it is the plain model (method ``none``).

    Example::

        task = Task(build_backbone("deepfm", schema, 16, device=torch.device("cpu")))
        loss, step = task(batch)  # step: loss, logits, labels, weights
    """

    stages: tuple[Stage, ...] = (CTR_STAGE,)
    extra_columns: tuple[str, ...] = ()  # columns of the split the loader puts into Batch.extras
    # whether the extra losses learn from rows without labels (data.unlabeled_splits): BCE never reads them
    learns_from_unlabeled: bool = False

    def __init__(self, model: Backbone, stages: tuple[Stage, ...] | None = None) -> None:
        super().__init__()
        self.model = model
        if stages is not None:  # stages that depend on the options (e.g. an optional pre-training stage)
            self.stages = stages
        self.stage = self.stages[0]

    # ---- hooks ---------------------------------------------------------------------------------
    def output(self, batch: Batch) -> CTROutput:
        """The whole CTR output of this task's model (what a student reads from its teacher)."""
        return self.model(batch)

    def score(self, batch: Batch) -> torch.Tensor:
        """The served logit."""
        return self.output(batch).logit

    def extra_losses(self, batch: Batch, out: CTROutput) -> dict[str, tuple[float, torch.Tensor]]:
        """Loss terms added to the BCE in CTR stages: name -> (weight, per-row values [B]); each adds
        ``weight`` times the values' mean over the batch's real rows, unlabeled ones included (a term that
        reads labels must zero them with :func:`labeled_weights`)."""
        return {}

    def stage_forward(self, batch: Batch) -> TaskOutput:
        """The loss of a non-CTR stage (``self.stage``); a task that declares one overrides this."""
        raise NotImplementedError(f"{type(self).__name__} declares stage {self.stage.name!r} but no stage_forward")

    def evaluator(self, stage: Stage, split_file: Path | None = None) -> Evaluator:
        """What the trainer collects and reduces to metrics in ``stage`` on the split in ``split_file``."""
        if stage.kind != "ctr":
            raise NotImplementedError(f"{type(self).__name__} declares stage {stage.name!r} but no evaluator")
        return CTREvaluator(split_file)

    @property
    def representation_dim(self) -> int:
        """The size of ``output(batch).representation``: the backbone's, unless the task adds to it."""
        return self.model.representation_dim

    def param_groups(self) -> list[ParamGroup]:
        """Dense parameters with their own optimizer settings; the rest form the group ``dense``."""
        return []

    def side_files(self, split: str) -> tuple[str, ...]:
        """Per-row files aligned with ``split`` (e.g. cached token ids) whose columns go into Batch.extras."""
        return ()

    def warm_start(self) -> dict[str, tuple[str, str]]:
        """``{parameter prefix: (checkpoint folder, the prefix of those tensors there)}`` loaded after
        sharding, unless the run resumes."""
        return {}

    # ---- the one forward -----------------------------------------------------------------------
    def set_stage(self, stage: Stage) -> None:
        if stage not in self.stages:
            raise ValueError(f"{type(self).__name__} has no stage {stage.name!r}; stages: "
                             f"{[s.name for s in self.stages]}")
        self.stage = stage

    def forward(self, batch: Batch) -> TaskOutput:
        if self.stage.kind != "ctr":
            return self.stage_forward(batch)
        out = self.output(batch)
        loss = weighted_bce(out.logit, batch)
        for weight, values in self.extra_losses(batch, out).values():
            loss = loss + weight * weighted_mean(values, batch)
        return loss, {"loss": loss.detach(), "logits": out.logit.detach(), "labels": batch.labels,
                      "weights": batch.weights}
