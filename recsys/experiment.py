"""One experiment: the configuration file's sections, and how an experiment becomes a trainer.

    cfg = load_config("recsys/configs/ml100k_deepfm.yaml", ["model.backbone=dcnv2", "train.seed=2"])
    trainer = build_trainer(cfg)    # process group, checks, seeded task from the method registry
    result = trainer.fit()

Sections: ``name``, ``data``, ``optim``, ``train`` (the trainer's, ``recsys.train.config``), ``model`` (the
backbone and its options, one sub-section per registered backbone) and ``method`` (``name`` plus one
sub-section per registered method's options: the section is derived from the method registry, so a new
method adds its options here by registering them).

This module is where the parts meet: it imports the backbones, the methods and the trainer, and nothing
below it imports it (methods reach it lazily, to read a teacher run's configuration).
"""

from __future__ import annotations

import os
import re
import typing
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Literal

import torch

import recsys.methods  # noqa: F401  (registers every method)
from recsys.data.schema import PreparedSchema
from recsys.methods.registry import METHODS, check_upstream, get_method
from recsys.models import BACKBONES, build_backbone
from recsys.models.autoint import AutoIntConfig
from recsys.models.base import Backbone
from recsys.models.dcnv2 import DCNv2Config
from recsys.models.deepfm import DeepFMConfig
from recsys.models.finalmlp import FinalMLPConfig
from recsys.models.fm import FMConfig
from recsys.models.wukong import WukongConfig
from recsys.train.config import (
    ConfigError,
    DataConfig,
    OptimConfig,
    TrainConfig,
    from_dict,
    read_yaml,
    to_plain,
)
from recsys.train.task import Task

if typing.TYPE_CHECKING:
    from recsys.train.distributed import DistEnv
    from recsys.train.trainer import Trainer


@dataclass
class ModelConfig:
    backbone: Literal[tuple(BACKBONES)] = "deepfm"  # type: ignore[valid-type]  # fm, deepfm, dcnv2, ...
    embedding_dim: int = 16
    fm: FMConfig = field(default_factory=FMConfig)
    deepfm: DeepFMConfig = field(default_factory=DeepFMConfig)
    dcnv2: DCNv2Config = field(default_factory=DCNv2Config)
    autoint: AutoIntConfig = field(default_factory=AutoIntConfig)
    finalmlp: FinalMLPConfig = field(default_factory=FinalMLPConfig)
    wukong: WukongConfig = field(default_factory=WukongConfig)

    def backbone_config(self) -> Any:
        return getattr(self, self.backbone)

    def build(self, schema: PreparedSchema, device: torch.device | None = None, num_extra_fields: int = 0,
              sequence_fields: tuple[str, ...] = ()) -> Backbone:
        """The configured backbone; ``device=None`` builds it on ``meta`` for DistributedModelParallel.
        ``sequence_fields``: read position by position too (a method that needs sequences asks for them)."""
        return build_backbone(self.backbone, schema, self.embedding_dim, self.backbone_config(), num_extra_fields,
                              device=device, sequence_fields=sequence_fields)


def _method_config_class() -> type:
    """``method``: ``name`` plus one sub-section per options class in the registry."""
    sections: dict[str, type] = {}
    for spec in METHODS.values():
        if spec.section is not None:
            sections.setdefault(spec.section, spec.config)
    return make_dataclass(
        "MethodConfig",
        [("name", Literal[tuple(METHODS)], "none")]  # type: ignore[valid-type]
        + [(name, cls, field(default_factory=cls)) for name, cls in sorted(sections.items())],
        namespace={"__doc__": "The method and every registered method's options (``method.<section>``)."})


MethodConfig = _method_config_class()


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)  # type: ignore[valid-type]
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        # the name is the run folder's name inside train.out_dir: it may not lead anywhere else
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", self.name) or ".." in self.name:
            raise ConfigError(f"name {self.name!r}: a run name is letters, digits, '_', '-' and '.' (it names the "
                              "run folder inside train.out_dir)")

    @property
    def run_dir(self) -> Path:
        return Path(self.train.out_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def describe(self) -> dict[str, str]:
        return {"backbone": self.model.backbone, "method": self.method.name}


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """An experiment from its YAML file (``None``: defaults) and ``section.key=value`` overrides."""
    return from_dict(ExperimentConfig, read_yaml(path, overrides), str(path) if path else "config")


def check_method(cfg: ExperimentConfig, schema: PreparedSchema | None = None) -> None:
    """The method's own checks and its upstream inputs (feature tables, teacher runs)."""
    spec = get_method(cfg.method.name)
    spec.check(cfg, schema)
    check_upstream(cfg)


def check_experiment(cfg: ExperimentConfig, env: DistEnv, schema: PreparedSchema | None = None) -> None:
    """Everything that can be wrong with an experiment, found before any training starts."""
    from recsys.train.trainer import check_run_config

    if cfg.model.embedding_dim <= 0 or cfg.model.embedding_dim % 4:
        raise ConfigError(f"model.embedding_dim={cfg.model.embedding_dim}: FBGEMM needs a positive multiple of 4")
    check_run_config(cfg, env)
    check_method(cfg, schema)


def build_task(schema: PreparedSchema, cfg: ExperimentConfig, device: torch.device | None = None) -> Task:
    """The training module for ``cfg``: the backbone wrapped by its method. ``device=None`` builds the
    backbone on the meta device, for DistributedModelParallel to materialise and shard."""
    return get_method(cfg.method.name).build(schema, cfg, device)


def build_trainer(cfg: ExperimentConfig, env: DistEnv | None = None) -> Trainer:
    """Join (or make) the process group, check the experiment, build its task seeded, hand it to the trainer."""
    from recsys.train.distributed import init_distributed
    from recsys.train.trainer import Trainer, seed_everything

    env = env or init_distributed()
    cores = os.cpu_count() or 1
    torch.set_num_threads(cfg.train.num_threads or max(1, cores // env.local_world_size))
    schema = PreparedSchema.load(cfg.data.path)
    check_experiment(cfg, env, schema)
    seed_everything(cfg.train.seed)  # before building: some methods initialise real-device modules
    return Trainer(cfg, build_task(schema, cfg), env, schema)


def method_summaries() -> str:
    return "\n".join(f"  {name:<14} {spec.summary}" for name, spec in METHODS.items())


__all__ = ["ExperimentConfig", "ModelConfig", "MethodConfig", "load_config", "check_experiment", "check_method",
           "build_task", "build_trainer"]
