"""ELEC: a language-model-enhanced gain network, distilled into a tabular-only vanilla network (the student).

- **Gain network** (:class:`ELECGainTask`): any backbone plus the adapted language model's user and item
  representations (``embedding_jobs.ctr_adapt``, then the embedding job), looked up by id from the feature
  tables and projected to the embedding size. ``inject="fields"`` appends them as two extra fields, so
  they enter the interaction *and* the deep input; ``inject="logit"`` (the default) adds a small MLP over
  them to the backbone's logit instead (late fusion). The default follows the ablation in
  benchmarks/results/elec_*.md: late fusion was at least as good as extra fields for DeepFM and DCNv2 on
  ML-100K and DeepFM on ML-1M, and extra fields collapsed DeepFM on ML-100K (0.72 against 0.80).
- **Vanilla network** (:class:`ELECStudentTask`): the same backbone with its own weights and tabular input
  only. Loss = BCE + ``score_weight`` * score distillation (binary KL of temperature-softened
  probabilities, times T^2, or MSE on logits) + ``rep_weight`` * MSE between the student's representation
  (through a learned projection when the sizes differ) and the gain network's. The teacher's outputs are
  detached in both terms: distillation never pushes gradients into the teacher.

  - ``mode="two_stage"``: the teacher is a finished gain-network run (``teacher_run``), loaded from its best
    checkpoint, frozen and run in eval mode without autograd (so its fused embedding optimizer never fires).
  - ``mode="joint"``: teacher and student train together (a pseudo-siamese pair); the teacher learns from
    its own BCE only.

The served model is the student alone: ``score`` is its logit, and ``recsys.serve.export`` writes it
without the teacher, the language model or the feature tables.

The language-model vectors are replicated buffers (not checkpointed: they are re-read, with their
fingerprint checked, from the feature tables). At industrial scale they would live in a frozen sharded
EmbeddingBagCollection instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection

from recsys.data.batch import Batch
from recsys.models.base import Backbone, CTROutput
from recsys.train.task import TaskOutput, weighted_bce

INJECT = ("fields", "logit")
MODES = ("two_stage", "joint")
SCORE_LOSSES = ("kl", "mse")


@dataclass
class ELECConfig:
    # gain network
    user_table: str = ""  # feature table of adapted user vectors (python -m embedding_jobs.run --entity user)
    item_table: str = ""  # feature table of adapted item vectors (either table may be left out)
    inject: str = "logit"  # logit: late fusion MLP (default, see the ablation); fields: two extra fields
    # std of each projected language-model coordinate at initialisation; 0: PyTorch's default Linear init,
    # about 0.58 on the standardised vectors, some 30x the id embeddings' scale (TorchRec's init)
    projection_std: float = 0.0
    # student
    mode: str = "two_stage"  # two_stage: distil a finished gain run (teacher_run); joint: train both together
    teacher_run: str = ""  # two_stage: the gain network's run folder
    score_weight: float = 1.0  # weight of the score-level distillation term
    score_loss: str = "kl"  # kl (soft labels with temperature) or mse (on logits)
    temperature: float = 1.0
    rep_weight: float = 0.0  # weight of the representation-level term

    def check(self) -> list[str]:
        problems = []
        if self.inject not in INJECT:
            problems.append(f"method.elec.inject={self.inject!r}: choose from {INJECT}")
        if self.mode not in MODES:
            problems.append(f"method.elec.mode={self.mode!r}: choose from {MODES}")
        if self.score_loss not in SCORE_LOSSES:
            problems.append(f"method.elec.score_loss={self.score_loss!r}: choose from {SCORE_LOSSES}")
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
def score_distillation(student: torch.Tensor, teacher: torch.Tensor, kind: str = "kl",
                       temperature: float = 1.0) -> torch.Tensor:
    """Per-row score-level distillation loss; ``teacher`` must already be detached.

    ``kl``: ``T^2 * KL(Bernoulli(sigmoid(z_t / T)) || Bernoulli(sigmoid(z_s / T)))`` (zero when the logits
    agree; T^2 keeps gradient sizes comparable across temperatures, as in Hinton et al.).
    ``mse``: ``(z_s - z_t)^2``.
    """
    if kind == "mse":
        return (student - teacher) ** 2
    t = temperature
    soft = torch.sigmoid(teacher / t)
    cross = F.binary_cross_entropy_with_logits(student / t, soft, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(teacher / t, soft, reduction="none")
    return t * t * (cross - entropy)


def representation_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-row mean squared error over the representation dimensions; ``teacher`` must be detached."""
    return ((student - teacher) ** 2).mean(dim=-1)


def weighted_mean(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    return (values * batch.weights).sum() / batch.weights.sum().clamp(min=1.0)


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
            ids = batch.sparse_features[name].values()  # single-valued: one id per row, padding rows too
            torch._assert(ids.numel() == batch.labels.numel(), f"{name} must hold exactly one id per row")
            out.append(self.projections[i](getattr(self, f"vectors_{i}")[ids]))
        return torch.stack(out, dim=1)


class ELECGainTask(nn.Module):
    """The gain network: a backbone that also sees the language model's user and item vectors.

    With ``inject="fields"`` the backbone must be built with ``num_extra_fields=len(lm.fields)``.

    Example::

        lm = LMVectors({"user_id": users, "item_id": items}, masks, dim=16)
        task = ELECGainTask(build_backbone("deepfm", schema, 16, num_extra_fields=2), lm, ELECConfig())
        loss, (_, logits, labels, weights) = task(batch)
    """

    def __init__(self, model: Backbone, lm: LMVectors, cfg: ELECConfig, device: torch.device | None = None) -> None:
        super().__init__()
        expected = len(lm.fields) if cfg.inject == "fields" else 0
        if model.num_extra_fields != expected:
            raise ValueError(f"inject={cfg.inject!r} needs a backbone built with num_extra_fields={expected}, "
                             f"got {model.num_extra_fields}")
        self.model, self.lm, self.inject = model, lm, cfg.inject
        d = model.embedding_dim
        self.late = (nn.Sequential(nn.Linear(len(lm.fields) * d, d, device=device), nn.ReLU(),
                                   nn.Linear(d, 1, device=device))
                     if cfg.inject == "logit" else None)

    def output(self, batch: Batch) -> CTROutput:
        vectors = self.lm(batch)
        if self.late is None:
            return self.model(batch, extra=vectors)
        out = self.model(batch)
        return CTROutput(logit=out.logit + self.late(vectors.flatten(1)).squeeze(-1),
                         representation=out.representation, field_embeddings=out.field_embeddings)

    def score(self, batch: Batch) -> torch.Tensor:
        return self.output(batch).logit

    def forward(self, batch: Batch) -> TaskOutput:
        logit = self.output(batch).logit
        loss = weighted_bce(logit, batch)
        return loss, (loss.detach(), logit.detach(), batch.labels, batch.weights)


# ------------------------------------------------------------------------------------------------
# Vanilla network (the served student)
# ------------------------------------------------------------------------------------------------
class ELECStudentTask(nn.Module):
    """The student backbone (``model``: tabular input only) distilled from a gain network (``teacher``).

    The teacher is any task with ``output(batch) -> CTROutput`` and a ``model`` backbone: an
    :class:`ELECGainTask`, or a plain ``CTRTask`` as the control that separates what the language model adds
    from what distillation alone does.

    With no teacher (both distillation weights zero) this is exactly the base model's BCE training.
    """

    def __init__(self, model: Backbone, teacher: nn.Module | None, cfg: ELECConfig,
                 device: torch.device | None = None) -> None:
        super().__init__()
        if cfg.distils and teacher is None:
            raise ValueError("distillation weights are set but there is no teacher")
        self.model, self.teacher, self.cfg = model, teacher, cfg
        self.frozen_teacher = teacher is not None and cfg.mode == "two_stage"
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
            s, t = model.representation_dim, teacher.model.representation_dim
            self.rep_projection = nn.Linear(s, t, device=device) if s != t else nn.Identity()

    def train(self, mode: bool = True) -> ELECStudentTask:
        super().train(mode)
        if self.frozen_teacher:
            self.teacher.train(False)  # a frozen teacher always predicts as it was evaluated
        return self

    def score(self, batch: Batch) -> torch.Tensor:
        """The served logit: the student's alone."""
        return self.model(batch).logit

    def _teacher(self, batch: Batch) -> CTROutput:
        if self.frozen_teacher:
            with torch.no_grad():
                return self.teacher.output(batch)
        return self.teacher.output(batch)

    def forward(self, batch: Batch) -> TaskOutput:
        out = self.model(batch)
        loss = weighted_bce(out.logit, batch)
        if self.teacher is not None:
            t = self._teacher(batch)
            if not self.frozen_teacher:
                loss = loss + weighted_bce(t.logit, batch)  # joint: the teacher learns from labels only
            if self.cfg.score_weight > 0:
                per_row = score_distillation(out.logit, t.logit.detach(), self.cfg.score_loss, self.cfg.temperature)
                loss = loss + self.cfg.score_weight * weighted_mean(per_row, batch)
            if self.rep_projection is not None:
                per_row = representation_distillation(self.rep_projection(out.representation),
                                                      t.representation.detach())
                loss = loss + self.cfg.rep_weight * weighted_mean(per_row, batch)
        return loss, (loss.detach(), out.logit.detach(), batch.labels, batch.weights)
