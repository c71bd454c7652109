"""ELEC: a language-model-enhanced gain network, distilled into a tabular-only vanilla network (the student).

- **Gain network** (:class:`ELECGainTask`): any backbone plus the adapted language model's user and item
  representations (``embedding_jobs.ctr_adapt``, then the embedding job), looked up by id from the feature
  tables and projected to the embedding size. ``inject="fields"`` appends them as two extra fields, so
  they enter the interaction *and* the deep input; ``inject="logit"`` (the default) adds a small MLP over
  them to the backbone's logit instead (late fusion). The default follows the ablation in
  benchmarks/results/elec_*.md: late fusion was at least as good as extra fields for DeepFM and DCNv2 on
  ML-100K and DeepFM on ML-1M, and extra fields collapsed DeepFM on ML-100K (0.72 against 0.80). With late
  fusion the gain network's ``representation`` is the backbone's concatenated with the late branch's hidden
  layer, so that representation distillation carries what the language model added.
- **Vanilla network** (:class:`ELECStudentTask`): the same backbone with its own weights and tabular input
  only. Loss = BCE + ``score_weight`` * score distillation (binary KL of temperature-softened
  probabilities, times T^2, or MSE on logits) + ``rep_weight`` * MSE between the student's representation
  (through a learned projection when the sizes differ) and the gain network's. The teacher's outputs are
  detached in both terms: distillation never pushes gradients into the teacher.

  - ``mode="two_stage"``: the teacher is a finished gain-network run (``teacher_run``), loaded from its best
    checkpoint, frozen and run in eval mode without autograd (so its fused embedding optimizer never fires).
  - ``mode="joint"``: teacher and student train together (a pseudo-siamese pair); the teacher learns from
    its own BCE only.

  A two-stage student can also learn from rows without labels (``data.unlabeled_splits=[valid]``: the
  validation impressions, their labels never read): BCE skips them, the distillation terms do not. Their ids
  count towards ``data.min_count``, so a cold item among them gets its own student embedding row, trained by
  the teacher's scores; the teacher still reads ``<unk>`` for it, as it did in its own run.

The served model is the student alone: ``score`` is its logit, and ``recsys.serve.export`` writes it
without the teacher, the language model or the feature tables.

The language-model vectors are replicated buffers (not checkpointed: they are re-read, with their
fingerprint checked, from the feature tables). At industrial scale they would live in a frozen sharded
EmbeddingBagCollection instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor

from recsys.data.batch import Batch
from recsys.data.schema import FieldKind, PreparedSchema
from recsys.methods.registry import MethodSpec, Upstream, check_upstream, get_method, register
from recsys.models.base import Backbone, CTROutput
from recsys.train.config import ConfigError
from recsys.train.task import Task

if TYPE_CHECKING:
    from recsys.experiment import ExperimentConfig


class Inject(StrEnum):
    LOGIT = "logit"  # late fusion: an MLP over the vectors, added to the logit
    FIELDS = "fields"  # the vectors as extra fields of the backbone


class Mode(StrEnum):
    TWO_STAGE = "two_stage"  # distil a finished gain run (teacher_run)
    JOINT = "joint"  # train teacher and student together


class ScoreLoss(StrEnum):
    KL = "kl"  # binary KL of temperature-softened probabilities, times T^2
    MSE = "mse"  # squared difference of logits


@dataclass
class ELECConfig:
    # gain network
    user_table: str = ""  # feature table of adapted user vectors (python -m embedding_jobs.run --entity user)
    item_table: str = ""  # feature table of adapted item vectors (either table may be left out)
    inject: Inject = Inject.LOGIT  # logit: late fusion MLP (default, see the ablation); fields: two extra fields
    # std of each projected language-model coordinate at initialisation; 0: PyTorch's default Linear init,
    # about 0.58 on the standardised vectors, some 30x the id embeddings' scale (TorchRec's init)
    projection_std: float = 0.0
    # student
    mode: Mode = Mode.TWO_STAGE  # two_stage: distil a finished gain run (teacher_run); joint: train both
    teacher_run: str = ""  # two_stage: the gain network's run folder
    score_weight: float = 1.0  # weight of the score-level distillation term
    score_loss: ScoreLoss = ScoreLoss.KL  # kl (soft labels with temperature) or mse (on logits)
    temperature: float = 1.0
    rep_weight: float = 0.0  # weight of the representation-level term

    def __post_init__(self) -> None:  # built in code with plain strings: the same enums, or a clear error
        self.inject, self.mode, self.score_loss = Inject(self.inject), Mode(self.mode), ScoreLoss(self.score_loss)

    def check(self) -> list[str]:
        problems = []
        if self.projection_std < 0:
            problems.append(f"method.elec.projection_std={self.projection_std}: must be >= 0 (0: default init)")
        if self.temperature <= 0 or self.score_weight < 0 or self.rep_weight < 0:
            problems.append("method.elec: temperature must be > 0 and the distillation weights >= 0")
        return problems

    @property
    def distils(self) -> bool:
        return self.score_weight > 0 or self.rep_weight > 0


# ------------------------------------------------------------------------------------------------
# Distillation losses: per-row values; the task takes the weighted mean over real rows
# ------------------------------------------------------------------------------------------------
def score_distillation(student: torch.Tensor, teacher: torch.Tensor, kind: ScoreLoss = ScoreLoss.KL,
                       temperature: float = 1.0) -> torch.Tensor:
    """Per-row score-level distillation loss; ``teacher`` must already be detached.

    ``kl``: ``T^2 * KL(Bernoulli(sigmoid(z_t / T)) || Bernoulli(sigmoid(z_s / T)))`` (zero when the logits
    agree; T^2 keeps gradient sizes comparable across temperatures, as in Hinton et al.).
    ``mse``: ``(z_s - z_t)^2``.
    """
    kind = ScoreLoss(kind)  # a string outside the enum is refused here, never treated as KL
    if kind is ScoreLoss.MSE:
        return (student - teacher) ** 2
    t = temperature
    soft = torch.sigmoid(teacher / t)
    cross = F.binary_cross_entropy_with_logits(student / t, soft, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(teacher / t, soft, reduction="none")
    return t * t * (cross - entropy)


def representation_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-row mean squared error over the representation dimensions; ``teacher`` must be detached."""
    return ((student - teacher) ** 2).mean(dim=-1)


# ------------------------------------------------------------------------------------------------
# Gain network
# ------------------------------------------------------------------------------------------------
class LMVectors(nn.Module):
    """The adapted language model's user and item vectors, looked up by id and projected to ``dim``.

    ``tables`` maps a single-valued sparse field (the one the table's keys index, e.g. ``user_id``) to its
    ``[vocab, d]`` vectors. They are standardised per dimension over the ids that have one (the adapted
    vectors' scale is arbitrary); ids without one (padding, unknown) stay zero. With ``projection_std`` > 0
    the projections start with weights of std ``projection_std / sqrt(d)``, so each projected coordinate
    starts with about that std (the id embeddings' scale, rather than PyTorch's default of about 0.58).
    """

    def __init__(self, tables: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], dim: int,
                 device: torch.device | None = None, projection_std: float = 0.0) -> None:
        super().__init__()
        self.fields = list(tables)
        self.projections = nn.ModuleList()
        for i, (name, vectors) in enumerate(tables.items()):
            vectors, mask = vectors.float(), masks[name]
            mean, std = vectors[mask].mean(0), vectors[mask].std(0).clamp(min=1e-6)
            standard = torch.where(mask[:, None], (vectors - mean) / std, torch.zeros_like(vectors))
            # built on the real device: DistributedModelParallel would zero a meta buffer
            self.register_buffer(f"vectors_{i}", standard.to(device), persistent=False)
            projection = nn.Linear(vectors.shape[1], dim, device=device)
            if projection_std > 0:
                nn.init.normal_(projection.weight, std=projection_std / vectors.shape[1] ** 0.5)
                nn.init.zeros_(projection.bias)
            self.projections.append(projection)

    def forward(self, batch: Batch) -> torch.Tensor:  # -> [B, len(fields), dim]
        out = []
        for i, name in enumerate(self.fields):
            # the stored ids (Batch.extras), not the embedding lookup's: a cold user keeps its own vector
            ids = batch.extras[name]
            out.append(self.projections[i](getattr(self, f"vectors_{i}")[ids]))
        return torch.stack(out, dim=1)


class ELECGainTask(Task):
    """The gain network: a backbone that also sees the language model's user and item vectors.

    With ``inject="fields"`` the backbone must be built with ``num_extra_fields=len(lm.fields)``.

    Example::

        lm = LMVectors({"user_id": users, "item_id": items}, masks, dim=16)
        task = ELECGainTask(build_backbone("deepfm", schema, 16, num_extra_fields=2), lm, ELECConfig())
        loss, step = task(batch)
    """

    def __init__(self, model: Backbone, lm: LMVectors, cfg: ELECConfig, device: torch.device | None = None) -> None:
        super().__init__(model)
        inject = Inject(cfg.inject)
        expected = len(lm.fields) if inject is Inject.FIELDS else 0
        if model.num_extra_fields != expected:
            raise ValueError(f"inject={inject.value!r} needs a backbone built with num_extra_fields={expected}, "
                             f"got {model.num_extra_fields}")
        self.lm, self.inject = lm, inject
        self.extra_columns = tuple(lm.fields)  # the loader hands the vectors' keys over as stored
        d = model.embedding_dim
        self.late = (nn.Sequential(nn.Linear(len(lm.fields) * d, d, device=device), nn.ReLU(),
                                   nn.Linear(d, 1, device=device))
                     if inject is Inject.LOGIT else None)

    @property
    def representation_dim(self) -> int:
        return self.model.representation_dim + (self.late[0].out_features if self.late is not None else 0)

    def output(self, batch: Batch) -> CTROutput:
        vectors = self.lm(batch)
        if self.late is None:
            return self.model(batch, extra=vectors)
        out = self.model(batch)
        hidden = self.late[1](self.late[0](vectors.flatten(1)))  # what the language model adds
        return CTROutput(logit=out.logit + self.late[2](hidden).squeeze(-1),
                         representation=torch.cat([out.representation, hidden], dim=-1),
                         field_embeddings=out.field_embeddings)


# ------------------------------------------------------------------------------------------------
# Vanilla network (the served student)
# ------------------------------------------------------------------------------------------------
@torch.fx.wrap  # one opaque step when TorchRec's train pipeline traces the model (it iterates over keys)
def relook_up(batch: Batch, keys: list[str], rows: list[torch.Tensor]) -> Batch:
    """``batch`` with the ids of field ``keys[i]`` replaced by ``rows[i][id]`` (other fields unchanged)."""
    kjt = batch.sparse_features
    by_key = dict(zip(keys, rows, strict=True))
    values = [by_key[k][v] if k in by_key else v
              for k, v in zip(kjt.keys(), kjt.values().split(kjt.length_per_key()), strict=True)]
    return replace(batch, sparse_features=KeyedJaggedTensor(
        keys=kjt.keys(), values=torch.cat(values), lengths=kjt.lengths(), stride=kjt.stride()))


# ------------------------------------------------------------------------------------------------
class ELECStudentTask(Task):
    """The student backbone (``model``: tabular input only) distilled from a gain network (``teacher``).

    The teacher is any task with ``output(batch) -> CTROutput`` and a ``model`` backbone: an
    :class:`ELECGainTask`, or a plain :class:`~recsys.train.task.Task` as the control that separates what the
    language model adds from what distillation alone does.

    With no teacher (both distillation weights zero) this is exactly the base model's BCE training.

    ``teacher_rows`` (per sparse field, the row the teacher reads for each row the student's lookup gives)
    is needed when the student looks ids up differently from its teacher's run: with unlabeled rows, an id
    they hold reads its own row in the student and ``<unk>`` in the teacher.
    """

    def __init__(self, model: Backbone, teacher: Task | None, cfg: ELECConfig,
                 device: torch.device | None = None, teacher_rows: dict[str, np.ndarray] | None = None) -> None:
        super().__init__(model)
        if cfg.distils and teacher is None:
            raise ValueError("distillation weights are set but there is no teacher")
        self.teacher, self.cfg = teacher, cfg
        self.extra_columns = teacher.extra_columns if teacher is not None else ()
        self.frozen_teacher = teacher is not None and Mode(cfg.mode) is Mode.TWO_STAGE
        # unlabeled rows teach through the teacher's scores alone: only a frozen teacher's are sound (a joint
        # teacher would meet their ids untrained)
        self.learns_from_unlabeled = self.frozen_teacher
        self.teacher_keys = list(teacher_rows or {})
        for i, rows in enumerate((teacher_rows or {}).values()):
            self.register_buffer(f"teacher_rows_{i}", torch.as_tensor(rows, dtype=torch.long, device=device),
                                 persistent=False)
        if self.frozen_teacher:
            # DDP must ignore the teacher's dense parameters. Its tables keep requires_grad (the fused
            # optimizer needs it to attach) but never update: the teacher runs without autograd.
            tables = {id(p) for m in teacher.modules() if isinstance(m, EmbeddingBagCollection)
                      for p in m.parameters()}
            for p in teacher.parameters():
                if id(p) not in tables:
                    p.requires_grad_(False)
        self.rep_projection: nn.Module | None = None
        if teacher is not None and cfg.rep_weight > 0:
            s, t = model.representation_dim, teacher.representation_dim
            self.rep_projection = nn.Linear(s, t, device=device) if s != t else nn.Identity()
        self.teacher_run = cfg.teacher_run if self.frozen_teacher else ""

    def train(self, mode: bool = True) -> ELECStudentTask:
        super().train(mode)
        if self.frozen_teacher:
            self.teacher.train(False)  # a frozen teacher always predicts as it was evaluated
        return self

    def warm_start(self) -> dict[str, tuple[str, str]]:
        """A two-stage teacher's weights come from the gain network's best checkpoint (its whole task)."""
        return {"teacher.": (str(Path(self.teacher_run) / "checkpoints" / "best"), "")} if self.teacher_run else {}

    def _teacher(self, batch: Batch) -> CTROutput:
        if self.frozen_teacher:
            if self.teacher_keys:
                rows = [getattr(self, f"teacher_rows_{i}") for i in range(len(self.teacher_keys))]
                batch = relook_up(batch, self.teacher_keys, rows)
            with torch.no_grad():
                return self.teacher.output(batch)
        return self.teacher.output(batch)

    def extra_losses(self, batch: Batch, out: CTROutput) -> dict[str, tuple[float, torch.Tensor]]:
        if self.teacher is None:
            return {}
        t = self._teacher(batch)
        terms: dict[str, tuple[float, torch.Tensor]] = {}
        if not self.frozen_teacher:
            # joint: the teacher learns from labels only
            terms["teacher_bce"] = (1.0, F.binary_cross_entropy_with_logits(t.logit, batch.labels, reduction="none"))
        if self.cfg.score_weight > 0:
            terms["score"] = (self.cfg.score_weight, score_distillation(
                out.logit, t.logit.detach(), self.cfg.score_loss, self.cfg.temperature))
        if self.rep_projection is not None:
            terms["representation"] = (self.cfg.rep_weight, representation_distillation(
                self.rep_projection(out.representation), t.representation.detach()))
        return terms


# ------------------------------------------------------------------------------------------------
# Registration: elec_gain and elec_student share the options section ``method.elec``
# ------------------------------------------------------------------------------------------------
TABLE_HINT = ("make it with `python -m embedding_jobs.run --entity user item --model ADAPTED_MODEL ...` "
              "(ADAPTED_MODEL from `python -m embedding_jobs.ctr_adapt`)")


def _uses_tables(cfg: ExperimentConfig) -> bool:
    e = cfg.method.elec
    return cfg.method.name == "elec_gain" or (e.distils and e.mode == Mode.JOINT)


def _needs(cfg: ExperimentConfig) -> list[Upstream]:
    e = cfg.method.elec
    needs = []
    if _uses_tables(cfg):
        for side in ("user", "item"):
            path = getattr(e, f"{side}_table")
            if path:  # one side alone is allowed (an ablation, or a dataset with item texts only)
                needs.append(Upstream(f"method.elec.{side}_table", path, f"the adapted {side} feature table",
                                      TABLE_HINT))
    if cfg.method.name == "elec_student" and e.distils and e.mode == Mode.TWO_STAGE:
        needs.append(Upstream("method.elec.teacher_run", e.teacher_run, "a finished gain-network run",
                              "train one with method.name=elec_gain, or use method.elec.mode=joint",
                              required_files=("config.yaml", "checkpoints/best", "test_metrics.json")))
    return needs


def _check_options(cfg: ExperimentConfig, schema: PreparedSchema | None) -> None:
    e = cfg.method.elec
    problems = e.check()
    if problems:
        raise ConfigError("; ".join(problems))
    if _uses_tables(cfg) and not (e.user_table or e.item_table):
        raise ConfigError(f"method.elec.user_table and method.elec.item_table are both unset; {TABLE_HINT}")


def _check_student(cfg: ExperimentConfig, schema: PreparedSchema | None) -> None:
    _check_options(cfg, schema)
    e = cfg.method.elec
    if not (e.distils and e.mode == Mode.TWO_STAGE):
        if cfg.data.unlabeled_splits:
            raise ConfigError(f"data.unlabeled_splits={cfg.data.unlabeled_splits}: only a two-stage student with a "
                              "distillation weight learns from unlabeled rows (through its frozen teacher's scores)")
        return
    from recsys.experiment import check_method, load_config

    check_upstream(cfg)
    run = Path(e.teacher_run)
    teacher = load_config(run / "config.yaml")
    if teacher.method.name not in ("elec_gain", "none"):
        raise ConfigError(f"{run} trained method {teacher.method.name!r}: a teacher is a gain network "
                          "(elec_gain) or, as a control, a plain model (none)")
    if teacher.data.min_count != cfg.data.min_count:
        raise ConfigError(f"{run} looked embeddings up with data.min_count={teacher.data.min_count}, the student "
                          f"with {cfg.data.min_count}: both must read the same rows")
    if not set(teacher.data.unlabeled_splits) <= set(cfg.data.unlabeled_splits):
        raise ConfigError(f"{run} trained with data.unlabeled_splits={teacher.data.unlabeled_splits}: the student "
                          "must include them")
    done = json.loads((run / "test_metrics.json").read_text())
    if schema is not None and done.get("fingerprint") != schema.fingerprint:
        raise ConfigError(f"{run} was trained on dataset {done.get('dataset')!r} (fingerprint "
                          f"{done.get('fingerprint')}), not on {schema.name!r} ({schema.fingerprint})")
    check_method(teacher, schema)


def _lm_vectors(schema: PreparedSchema, cfg: ExperimentConfig) -> LMVectors:
    """The adapted user and item vectors, keyed by the field their table indexes (``user_id``, ``item_id``)."""
    from recsys.features import load_feature_table

    tables, masks = {}, {}
    for entity, path in (("user", cfg.method.elec.user_table), ("item", cfg.method.elec.item_table)):
        if not path:
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


def _build_gain(schema: PreparedSchema, cfg: ExperimentConfig, device: torch.device | None) -> Task:
    lm = _lm_vectors(schema, cfg)
    extra = len(lm.fields) if cfg.method.elec.inject == Inject.FIELDS else 0
    return ELECGainTask(cfg.model.build(schema, device, extra), lm, cfg.method.elec)


def teacher_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The gain network a student learns from: the finished ``teacher_run`` (two-stage), or, in joint mode,
    the student's own experiment as a gain network."""
    from recsys.experiment import load_config

    e = cfg.method.elec
    if e.mode == Mode.JOINT:
        return replace(cfg, method=replace(cfg.method, name="elec_gain"))
    return load_config(Path(e.teacher_run) / "config.yaml")


def _build_student(schema: PreparedSchema, cfg: ExperimentConfig, device: torch.device | None) -> Task:
    e = cfg.method.elec
    # a gain network; in two-stage mode a plain model's run also works (the control: distillation without
    # any language model)
    teacher, rows = None, None
    if e.distils:
        tc = teacher_config(cfg)
        teacher = get_method(tc.method.name).build(schema, tc, device)
        if e.mode == Mode.TWO_STAGE and cfg.data.unlabeled_splits != tc.data.unlabeled_splits:
            rows = teacher_rows(schema, cfg, tc)
    return ELECStudentTask(cfg.model.build(schema, device), teacher, e, teacher_rows=rows)


def teacher_rows(schema: PreparedSchema, cfg: ExperimentConfig, tc: ExperimentConfig) -> dict[str, np.ndarray]:
    """Per sparse field, the embedding row the teacher's run read for each row the student's lookup gives.

    The student's lookup sends an id to its own row or ``<unk>``'s, and to its own row whenever the teacher's
    does (it counts the teacher's rows and more), so the teacher's lookup applied to the student's rows gives
    the teacher's rows; checked here for every id.
    """
    from recsys.data.loader import embedding_lookup

    student = embedding_lookup(cfg.data.path, schema, cfg.data.min_count, cfg.data.unlabeled_splits)
    teacher = embedding_lookup(tc.data.path, schema, tc.data.min_count, tc.data.unlabeled_splits)
    for table, rows in teacher.items():
        if not np.array_equal(rows[student[table]], rows):
            raise ConfigError(f"vocabulary {table}: the student looks some ids up in rows its teacher's run did not "
                              "train, and not as <unk>; the teacher's data.unlabeled_splits must be among the "
                              "student's, with the same data.min_count")
    return {f.name: teacher[f.table] for f in schema.sparse_fields}


register(MethodSpec(name="elec_gain", summary="ELEC's gain network: a backbone plus adapted user/item vectors",
                    build=_build_gain, section="elec", config=ELECConfig, check=_check_options, needs=_needs))
register(MethodSpec(name="elec_student", summary="ELEC's tabular-only student, distilled from a gain network",
                    build=_build_student, section="elec", config=ELECConfig, check=_check_student, needs=_needs,
                    exports=True))
