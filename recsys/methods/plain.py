"""The plain backbone (method ``none``): binary cross-entropy on the backbone's logit, nothing added."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from recsys.data.schema import PreparedSchema
from recsys.methods.registry import MethodSpec, register
from recsys.train.task import Task

if TYPE_CHECKING:
    from recsys.experiment import ExperimentConfig


def _build(schema: PreparedSchema, cfg: ExperimentConfig, device: torch.device | None) -> Task:
    return Task(cfg.model.build(schema, device))


SPEC = register(MethodSpec(name="none", summary="the plain backbone, BCE", build=_build, exports=True))
