"""An L2 penalty on the embeddings a batch looks up (FuxiCTR's ``embedding_regularizer``).

The smallest complete method, and the README's example of how to add one: options, a task that adds one
loss term, and the registration. Serving is the plain backbone's (the penalty only shapes training)::

    python -m recsys.train --config recsys/configs/ml100k_deepfm.yaml method.name=embedding_l2 \
        method.embedding_l2.weight=1e-5
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from recsys.data.batch import Batch
from recsys.data.schema import PreparedSchema
from recsys.methods.registry import MethodSpec, register
from recsys.models.base import Backbone, CTROutput
from recsys.train.config import ConfigError
from recsys.train.task import Task

if TYPE_CHECKING:
    from recsys.experiment import ExperimentConfig


@dataclass
class EmbeddingL2Config:
    weight: float = 1e-5  # times the squared L2 norm of each row's field embeddings


class EmbeddingL2Task(Task):
    """BCE plus ``weight * ||e||^2`` over each row's ``[N, D]`` field embeddings."""

    def __init__(self, model: Backbone, weight: float) -> None:
        super().__init__(model)
        self.weight = weight

    def extra_losses(self, batch: Batch, out: CTROutput) -> dict[str, tuple[float, torch.Tensor]]:
        return {"embedding_l2": (self.weight, out.field_embeddings.pow(2).sum(dim=(1, 2)))}


def _build(schema: PreparedSchema, cfg: ExperimentConfig, device: torch.device | None) -> Task:
    return EmbeddingL2Task(cfg.model.build(schema, device), cfg.method.embedding_l2.weight)


def _check(cfg: ExperimentConfig, schema: PreparedSchema | None) -> None:
    if cfg.method.embedding_l2.weight < 0:
        raise ConfigError(f"method.embedding_l2.weight={cfg.method.embedding_l2.weight}: must be >= 0")


SPEC = register(MethodSpec(name="embedding_l2", summary="an L2 penalty on the looked-up embeddings",
                           build=_build, section="embedding_l2", config=EmbeddingL2Config, check=_check,
                           exports=True))
