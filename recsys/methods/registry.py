"""The method registry: every method is one module that registers a :class:`MethodSpec`, as every backbone
registers a ``BackboneSpec``.

A spec says everything the rest of the project needs to know about a method, so that nothing outside the
method's own file names it: its options (a dataclass, the experiment's ``method.<section>``), how it builds
its task, what it checks before training, what it needs upstream (feature tables, finished runs), and
whether its served model is a bare backbone that ``recsys.serve`` can export.

Registering a method (the whole of ``recsys/methods/embedding_l2.py`` is a real example)::

    register(MethodSpec(name="embedding_l2", summary="...", build=_build, section="embedding_l2",
                        config=EmbeddingL2Config, exports=True))

and one import line in ``recsys/methods/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from recsys.data.schema import PreparedSchema
from recsys.train.config import ConfigError
from recsys.train.task import Task

if TYPE_CHECKING:
    from recsys.experiment import ExperimentConfig


@dataclass(frozen=True)
class Upstream:
    """Something a method reads that an earlier job makes: a feature table, a finished run, a model folder."""

    option: str  # the configuration key that names it, e.g. method.llactr.field_table
    path: str
    what: str  # e.g. "the field feature table"
    hint: str  # the command that makes it
    required_files: tuple[str, ...] = ()  # files that must be inside the folder for it to be complete

    def problem(self) -> str | None:
        """Why it cannot be used yet, or None."""
        if not self.path:
            return f"{self.option} is not set: it names {self.what}; {self.hint}"
        p = Path(self.path)
        if not p.exists():
            return f"{self.option}={self.path!r} does not exist: it should be {self.what}; {self.hint}"
        missing = [f for f in self.required_files if not (p / f).exists()]
        if missing:
            return f"{self.option}={self.path!r} is not {self.what}: it lacks {', '.join(missing)}; {self.hint}"
        return None


def _no_needs(cfg: ExperimentConfig) -> list[Upstream]:
    return []


def _no_check(cfg: ExperimentConfig, schema: PreparedSchema | None) -> None:
    return None


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str  # one line for --help and errors
    build: Callable[[PreparedSchema, ExperimentConfig, torch.device | None], Task]
    section: str | None = None  # the options' section under `method` (several methods may share one)
    config: type | None = None  # the section's dataclass
    check: Callable[[ExperimentConfig, PreparedSchema | None], None] = _no_check  # raises ConfigError
    needs: Callable[[ExperimentConfig], list[Upstream]] = _no_needs
    # the served logit is task.model's own, so recsys.serve exports that backbone alone (a callable: it depends
    # on the options, e.g. whether the language model stays in the served model)
    exports: bool | Callable[[ExperimentConfig], bool] = False
    # a served model that is more than a backbone but needs no language model at serving time (recsys.serve):
    # export_task(task, cfg, folder, inputs) -> (state dict to save, export.json additions) writes the method's
    # files into the export folder; load_task(task, folder, state, meta) makes a rebuilt task ready to score
    export_task: Callable[[Task, ExperimentConfig, Path, dict[str, str]], tuple[dict, dict]] | None = None
    load_task: Callable[[Task, Path, dict, dict], None] | None = None
    tags: dict[str, Any] = field(default_factory=dict)


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} is registered twice")
    if (spec.section is None) != (spec.config is None):
        raise ValueError(f"method {spec.name!r}: section and config go together")
    for other in METHODS.values():
        if spec.section is not None and other.section == spec.section and other.config is not spec.config:
            raise ValueError(f"methods {other.name!r} and {spec.name!r} both use section {spec.section!r} "
                             "with different option classes")
    METHODS[spec.name] = spec
    return spec


def exportable(cfg: ExperimentConfig) -> bool:
    """Whether a run of ``cfg`` serves a bare backbone."""
    e = get_method(cfg.method.name).exports
    return e(cfg) if callable(e) else e


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"method.name {name!r} is unknown; choose from {sorted(METHODS)}") from None


def check_upstream(cfg: ExperimentConfig) -> None:
    """Refuse an experiment whose method's inputs do not exist yet, naming each and how to make it."""
    problems = [p for u in get_method(cfg.method.name).needs(cfg) if (p := u.problem())]
    if problems:
        raise ConfigError("; ".join(problems))
