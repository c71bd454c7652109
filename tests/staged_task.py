"""A two-stage task for the trainer's contract tests: a pre-training stage on sequences, then CTR.

The pre-training stage reads ``hist_item_id`` position by position (the per-position path: an
EmbeddingCollection that shares ``item_id``'s table) and learns to predict the target item's embedding from
the history's, weighted per row by an extra column; the language-model stand-in ``head`` is a parameter
group with its own learning rate and schedule. Not a method of the project: it exercises the protocol.
"""

from __future__ import annotations

import torch
from torch import nn

from recsys.data.batch import Batch
from recsys.data.schema import PreparedSchema
from recsys.experiment import ExperimentConfig
from recsys.train.evaluation import Evaluator, RatioEvaluator
from recsys.train.task import CTR_STAGE, ParamGroup, Stage, Task, TaskOutput

PRETRAIN = Stage(name="pretrain", monitor="mse", mode="min", kind="pretrain")


class StagedTask(Task):
    stages = (PRETRAIN, CTR_STAGE)
    extra_columns = ("row_no",)

    def __init__(self, schema: PreparedSchema, cfg: ExperimentConfig, device: torch.device | None = None) -> None:
        super().__init__(cfg.model.build(schema, device, sequence_fields=("hist_item_id",)))
        d = cfg.model.embedding_dim
        self.head = nn.Sequential(nn.Linear(d, d, device=device), nn.Tanh(), nn.Linear(d, d, device=device))
        self.item = schema.sparse_fields.index(schema.field("item_id"))

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup("head", ("head.",), lr=0.01, schedule="linear", warmup_steps=2)]

    def stage_forward(self, batch: Batch) -> TaskOutput:
        emb, sequences = self.model.sparse_arch.embed(batch)
        history, mask = sequences["hist_item_id"]
        pooled = (history * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        target = emb[:, self.item].detach()
        per_row = (self.head(pooled) - target).pow(2).mean(-1) * batch.extras["row_no"].float().clamp(min=1)
        w = batch.weights
        loss = (per_row * w).sum() / w.sum().clamp(min=1)
        return loss, {"loss": loss.detach(), "weights": w, "loss_sum": (per_row * w).sum().detach(), "rows": w.sum()}

    def evaluator(self, stage: Stage, split_file=None) -> Evaluator:
        if stage.kind == "pretrain":
            return RatioEvaluator({"mse": ("loss_sum", "rows")})
        return super().evaluator(stage, split_file)
