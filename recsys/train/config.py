"""The trainer's configuration sections (``data``, ``optim``, ``train``) and the typed converter every
configuration in the project goes through.

The whole experiment (these sections plus ``model`` and ``method``) is :class:`recsys.experiment.ExperimentConfig`;
this module knows no backbone and no method. The converter checks every value against its annotation:
``int``/``float``/``str``/``bool``, lists, tuples, ``dict[str, X]``, ``X | None``, nested dataclasses,
``Literal[...]`` and ``StrEnum`` (an option outside its allowed values is refused with them named).

Overrides use dotted keys and YAML values: ``train.seed=3 model.deepfm.hidden=[200,200]``.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""


@dataclass
class DataConfig:
    path: str = "runs/data/ml-100k"  # a prepared dataset folder (python -m recsys.prepare)
    batch_size: int = 4096  # global: each of W ranks takes batch_size / W rows per step
    eval_batch_size: int = 16384
    window_row_groups: int = 8  # row groups shuffled together (bounded memory for large splits)
    # ids with fewer training rows than this read the unknown id's embedding row, which is then trained (on
    # the ids seen once); 1: only ids never seen in training do (see recsys.data.loader.embedding_lookup)
    min_count: int = 2
    # splits whose rows join the training rows without their labels, e.g. [valid]: impressions a task that
    # learns from unlabeled rows (ELEC's student, through its teacher's scores) trains on; the ids they hold
    # count towards min_count, so a cold item among them gets its own embedding row
    unlabeled_splits: list[str] = field(default_factory=list)


Schedule = Literal["constant", "linear", "cosine"]


@dataclass
class GroupOptimConfig:
    """Settings of one dense parameter group a task declares (``optim.groups.NAME``); unset: the task's
    default for that group, else ``optim.dense_*``."""

    optimizer: Literal["adam", "adamw", "adagrad", "sgd"] | None = None
    lr: float | None = None
    weight_decay: float | None = None
    schedule: Schedule | None = None  # after warm-up: constant, linear decay to 0, or cosine to 0
    warmup_steps: int | None = None


@dataclass
class OptimConfig:
    # Embedding tables use FBGEMM's fused optimizers (applied in backward). On CPU FBGEMM offers
    # adagrad, rowwise_adagrad and sgd; adam needs a GPU.
    embedding_optimizer: Literal["adagrad", "rowwise_adagrad", "sgd", "adam"] = "adagrad"
    embedding_lr: float = 0.1
    embedding_eps: float = 1e-8
    dense_optimizer: Literal["adam", "adamw", "adagrad", "sgd"] = "adam"
    dense_lr: float = 1e-3
    dense_weight_decay: float = 0.0
    # per parameter group of the task (e.g. a language model beside the CTR model): {plm: {lr: 1e-5}}
    groups: dict[str, GroupOptimConfig] = field(default_factory=dict)


@dataclass
class TrainConfig:
    epochs: int = 5  # per stage, unless a stage sets its own (train.stage_epochs)
    seed: int = 2024
    patience: int = 1  # stop a stage after this many epochs without a better monitored metric
    out_dir: str = "runs/train"  # the run goes to out_dir/<name>
    sharding_types: list[str] | None = None  # e.g. [table_wise, column_wise]; None: the planner chooses
    pipeline: bool = True  # TrainPipelineSparseDist (overlaps input distribution with compute)
    num_threads: int | None = None  # torch threads per rank; None: cores / local ranks
    max_steps_per_epoch: int | None = None  # for smoke tests
    resume: bool = True  # continue from the run folder's last complete checkpoint
    progress: bool = True
    stage_epochs: dict[str, int] = field(default_factory=dict)  # epochs of named stages, e.g. {pretrain: 3}
    # at most this many steps per epoch of named stages (a row budget: steps x batch size), e.g. {pretrain: 200}
    stage_steps: dict[str, int] = field(default_factory=dict)
    # the global training (and validation) batch of named stages (default data.batch_size and
    # data.eval_batch_size), e.g. {pretrain: 64}
    stage_batch_size: dict[str, int] = field(default_factory=dict)
    # the embedding learning rate of named stages (default optim.embedding_lr), e.g. {pretrain: 0.0}
    stage_embedding_lr: dict[str, float] = field(default_factory=dict)
    # the learning rate of named dense parameter groups in named stages (over optim.groups and the task's
    # defaults), e.g. {pretrain: {dense: 0.0}}: the CTR model's dense layers left as they entered pre-training
    stage_group_lr: dict[str, dict[str, float]] = field(default_factory=dict)
    # named stages that start with the fused embedding optimizer's state zeroed (Adagrad's sums), as a fine-tuning
    # script that builds a new optimizer would, e.g. [ctr]; by default it carries on from the stage before
    fresh_embedding_optimizer: list[str] = field(default_factory=list)
    # validate named (non-final) stages on at most this many batches of the validation split, e.g. {pretrain: 20}
    stage_eval_steps: dict[str, int] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# The typed converter
# ------------------------------------------------------------------------------------------------
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
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed):
            raise ConfigError(f"{where}: {value!r} is not allowed; choose from {list(allowed)}")
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not allowed; choose from {[m.value for m in tp]}") from None
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        items = [_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        return {_convert(key_tp, k, f"{where} key"): _convert(value_tp, v, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{where}: the configuration cannot hold a {tp!r} (a bug in the option's declaration)")


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


def to_plain(obj: Any) -> Any:
    """A dataclass as plain YAML-able data (enums by value, tuples as lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


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


def override(key: str, value: Any) -> str:
    """The ``key=value`` override that sets ``key`` to ``value`` (a mapping or list written as YAML flow)."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=float("inf"))
    return f"{key}=" + text.removesuffix("...\n").strip()  # a scalar's YAML document ends with "..."


def read_yaml(path: str | Path | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """An experiment file as a mapping, with ``overrides`` applied (``None``: overrides alone)."""
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
    return apply_overrides(data, overrides or [])
