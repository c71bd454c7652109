"""Methods that wrap or extend any backbone. ``build_task`` turns an experiment into the module the one
trainer trains: a backbone inside a training wrapper that owns the loss.

``method.name`` picks the method:

- ``none``: the plain backbone, BCE;
- ``llactr``: field-level language-model knowledge (``method.llactr.field_table=PATH``);
- ``elec_gain``: ELEC's gain network, the backbone plus adapted user/item vectors
  (``method.elec.user_table=PATH method.elec.item_table=PATH``);
- ``elec_student``: ELEC's vanilla network distilled from a gain network
  (``method.elec.teacher_run=RUN_DIR``, or ``method.elec.mode=joint`` with the tables).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from recsys.data.schema import FieldKind, PreparedSchema
from recsys.models import build_backbone
from recsys.models.base import Backbone
from recsys.train.config import ConfigError, ExperimentConfig, load_config
from recsys.train.task import CTRTask

TaskBuilder = Callable[[PreparedSchema, ExperimentConfig, "torch.device | None"], nn.Module]


def _backbone(schema: PreparedSchema, cfg: ExperimentConfig, device: torch.device | None,
              num_extra_fields: int = 0) -> Backbone:
    m = cfg.model
    return build_backbone(m.backbone, schema, m.embedding_dim, m.backbone_config(), num_extra_fields, device=device)


def _plain(schema: PreparedSchema, cfg: ExperimentConfig, device: torch.device | None) -> nn.Module:
    return CTRTask(_backbone(schema, cfg, device))


def _llactr(schema: PreparedSchema, cfg: ExperimentConfig, device: torch.device | None) -> nn.Module:
    from recsys.features import load_feature_table
    from recsys.methods.llactr import LLaCTRTask

    backbone = _backbone(schema, cfg, device)
    table = load_feature_table(cfg.method.llactr.field_table, expect_fingerprint=schema.fingerprint,
                               expect_entity="field", num_rows=len(schema.fields))
    # the table is keyed by schema position; the sparse arch orders sparse fields before dense ones
    position = {f.name: i for i, f in enumerate(schema.fields)}
    order = [position[name] for name in backbone.sparse_arch.field_names]
    return LLaCTRTask(backbone, table.embeddings[order], cfg.method.llactr)


def _lm_vectors(schema: PreparedSchema, cfg: ExperimentConfig):
    """The adapted user and item vectors, keyed by the field their table indexes (``user_id``, ``item_id``)."""
    from recsys.features import load_feature_table
    from recsys.methods.elec import LMVectors

    tables, masks = {}, {}
    for entity, path in (("user", cfg.method.elec.user_table), ("item", cfg.method.elec.item_table)):
        if not path:  # one side alone is allowed (an ablation, or a dataset with item texts only)
            continue
        table = load_feature_table(path, expect_fingerprint=schema.fingerprint, expect_entity=entity)
        name = table.metadata.table
        try:
            f = schema.field(name)
        except KeyError as e:
            raise ConfigError(f"{path}: the {entity} table is keyed by {name!r}: {e}") from None
        if f.kind is not FieldKind.CATEGORICAL or f.vocab_size != table.embeddings.shape[0]:
            raise ConfigError(f"{path}: the {entity} table has {table.embeddings.shape[0]} rows keyed by {name!r}, "
                              f"which must be a single-valued field with that many ids (it has {f.vocab_size})")
        tables[name], masks[name] = table.embeddings, table.mask
    return LMVectors(tables, masks, cfg.model.embedding_dim, projection_std=cfg.method.elec.projection_std)


def _elec_gain(schema: PreparedSchema, cfg: ExperimentConfig, device: torch.device | None) -> nn.Module:
    from recsys.methods.elec import ELECGainTask

    lm = _lm_vectors(schema, cfg)
    extra = len(lm.fields) if cfg.method.elec.inject == "fields" else 0
    return ELECGainTask(_backbone(schema, cfg, device, extra), lm, cfg.method.elec)


def teacher_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The gain network a student learns from: the finished ``teacher_run`` (two-stage), or, in joint mode,
    the student's own experiment as a gain network."""
    e = cfg.method.elec
    if e.mode == "joint":
        return replace(cfg, method=replace(cfg.method, name="elec_gain"))
    return load_config(Path(e.teacher_run) / "config.yaml")


def _elec_student(schema: PreparedSchema, cfg: ExperimentConfig, device: torch.device | None) -> nn.Module:
    from recsys.methods.elec import ELECStudentTask

    e = cfg.method.elec
    # a gain network; in two-stage mode a plain model's run also works (the control: distillation without
    # any language model)
    teacher = build_task(schema, teacher_config(cfg), device) if e.distils else None
    task = ELECStudentTask(_backbone(schema, cfg, device), teacher, e)
    if teacher is not None and e.mode == "two_stage":
        # the trainer loads these weights after sharding (unless it resumes the student's own run)
        task.warm_start = {"teacher.": str(Path(e.teacher_run) / "checkpoints" / "best")}
    return task


METHODS: dict[str, TaskBuilder] = {
    "none": _plain,
    "llactr": _llactr,
    "elec_gain": _elec_gain,
    "elec_student": _elec_student,
}


def check_method(cfg: ExperimentConfig, schema: PreparedSchema | None = None) -> None:
    """Everything about ``method`` that can be checked before building anything."""
    name, e = cfg.method.name, cfg.method.elec
    if name not in METHODS:
        raise ConfigError(f"method.name {name!r} is unknown; choose from {sorted(METHODS)}")
    if name == "llactr" and not Path(cfg.method.llactr.field_table).exists():
        raise ConfigError(f"method.llactr.field_table={cfg.method.llactr.field_table!r} does not exist; make it "
                          "with `python -m embedding_jobs.run --entity field ...`")
    if not name.startswith("elec"):
        return
    problems = e.check()
    if problems:
        raise ConfigError("; ".join(problems))
    needs_tables = name == "elec_gain" or (e.distils and e.mode == "joint")
    hint = ("make it with `python -m embedding_jobs.run --entity user item --model ADAPTED_MODEL ...` "
            "(ADAPTED_MODEL from `python -m embedding_jobs.ctr_adapt`)")
    if needs_tables and not (e.user_table or e.item_table):
        raise ConfigError(f"method.elec.user_table and method.elec.item_table are both unset; {hint}")
    for key in ("user_table", "item_table") if needs_tables else ():
        if getattr(e, key) and not Path(getattr(e, key)).exists():
            raise ConfigError(f"method.elec.{key}={getattr(e, key)!r} does not exist; {hint}")
    if name == "elec_student" and e.distils and e.mode == "two_stage":
        run = Path(e.teacher_run) if e.teacher_run else None
        if run is None or not (run / "test_metrics.json").is_file() or not (run / "checkpoints" / "best").is_dir():
            raise ConfigError(f"method.elec.teacher_run={e.teacher_run!r} is not a finished gain-network run "
                              "(it needs config.yaml, checkpoints/best and test_metrics.json); train one with "
                              "method.name=elec_gain, or use method.elec.mode=joint")
        teacher = load_config(run / "config.yaml")
        if teacher.method.name not in ("elec_gain", "none"):
            raise ConfigError(f"{run} trained method {teacher.method.name!r}: a teacher is a gain network "
                              "(elec_gain) or, as a control, a plain model (none)")
        done = json.loads((run / "test_metrics.json").read_text())
        if schema is not None and done.get("fingerprint") != schema.fingerprint:
            raise ConfigError(f"{run} was trained on dataset {done.get('dataset')!r} (fingerprint "
                              f"{done.get('fingerprint')}), not on {schema.name!r} ({schema.fingerprint})")
        check_method(teacher, schema)


def build_task(schema: PreparedSchema, cfg: ExperimentConfig, device: torch.device | None = None) -> nn.Module:
    """The training module for ``cfg``: backbone wrapped by its method. ``device=None`` builds the backbone on
    the meta device, for DistributedModelParallel to materialise and shard."""
    return METHODS[cfg.method.name](schema, cfg, device)
