"""Experiment configuration: typed dataclasses, one YAML file per experiment, command-line overrides.

Example experiment file::

    name: ml100k_deepfm
    data: {path: runs/data/ml-100k, batch_size: 4096}
    model: {backbone: deepfm, embedding_dim: 16, deepfm: {hidden: [400, 400]}}
    optim: {embedding_optimizer: adagrad, embedding_lr: 0.1, dense_lr: 0.001}
    train: {epochs: 5, seed: 2024}

Overrides use dotted keys and YAML values: ``train.seed=3 model.deepfm.hidden=[200,200]``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recsys.methods.elec import ELECConfig
from recsys.methods.llactr import LLaCTRConfig
from recsys.models.autoint import AutoIntConfig
from recsys.models.dcnv2 import DCNv2Config
from recsys.models.deepfm import DeepFMConfig
from recsys.models.finalmlp import FinalMLPConfig
from recsys.models.fm import FMConfig
from recsys.models.wukong import WukongConfig


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""


@dataclass
class DataConfig:
    path: str = "runs/data/ml-100k"  # a prepared dataset folder (python -m recsys.prepare)
    batch_size: int = 4096  # global: each of W ranks takes batch_size / W rows per step
    eval_batch_size: int = 16384
    window_row_groups: int = 8  # row groups shuffled together (bounded memory for large splits)


@dataclass
class ModelConfig:
    backbone: str = "deepfm"  # fm, deepfm, dcnv2, autoint, finalmlp, wukong
    embedding_dim: int = 16
    fm: FMConfig = field(default_factory=FMConfig)
    deepfm: DeepFMConfig = field(default_factory=DeepFMConfig)
    dcnv2: DCNv2Config = field(default_factory=DCNv2Config)
    autoint: AutoIntConfig = field(default_factory=AutoIntConfig)
    finalmlp: FinalMLPConfig = field(default_factory=FinalMLPConfig)
    wukong: WukongConfig = field(default_factory=WukongConfig)

    def backbone_config(self) -> Any:
        return getattr(self, self.backbone)


@dataclass
class MethodConfig:
    name: str = "none"  # none (the plain backbone), llactr, elec_gain or elec_student
    llactr: LLaCTRConfig = field(default_factory=LLaCTRConfig)
    elec: ELECConfig = field(default_factory=ELECConfig)


@dataclass
class OptimConfig:
    # Embedding tables use FBGEMM's fused optimizers (applied in backward). On CPU FBGEMM offers
    # adagrad, rowwise_adagrad and sgd; adam needs a GPU.
    embedding_optimizer: str = "adagrad"
    embedding_lr: float = 0.1
    embedding_eps: float = 1e-8
    dense_optimizer: str = "adam"  # adam, adagrad, sgd
    dense_lr: float = 1e-3
    dense_weight_decay: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 5
    seed: int = 2024
    patience: int = 1  # stop after this many epochs without a better validation AUC
    out_dir: str = "runs/train"  # the run goes to out_dir/<name>
    sharding_types: list[str] | None = None  # e.g. [table_wise, column_wise]; None: the planner chooses
    pipeline: bool = True  # TrainPipelineSparseDist (overlaps input distribution with compute)
    num_threads: int | None = None  # torch threads per rank; None: cores / local ranks
    max_steps_per_epoch: int | None = None  # for smoke tests
    resume: bool = True  # continue from the run folder's last complete checkpoint
    progress: bool = True


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
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
        return dataclasses.asdict(self)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        items = [_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any] | None, where: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrongly typed values."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(names)}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}  # safe_load: a tag never constructs an object
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: an experiment file is a mapping of sections")
    data = apply_overrides(data, overrides or [])
    return from_dict(ExperimentConfig, data, str(path) if path else "config")
