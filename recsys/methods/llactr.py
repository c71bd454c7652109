"""LLaCTR: field-level language-model knowledge that enhances any backbone (Zhang et al., 2025).

The K field names, embedded once by a language model fine-tuned on field/feature pairs
(``embedding_jobs``: entity ``field``), are a fixed ``[K, d]`` tensor. Two enhancements use it, written
once for every backbone through the CTR contract (``CTROutput.field_embeddings``):

- **FRE** (representation enhancement): each field embedding ``f_k`` is projected to the CTR embedding size
  ``D``, and every feature embedding ``e_k`` of that field is pulled towards it by
  ``KL(softmax(W f_k) || softmax(e_k))`` over the D dimensions, weighted by ``lambda_loss``. Per row the K
  fields' KLs are averaged (``fre_reduction=field_mean``, what the records so far used) or summed
  (``sum``: the reference code's ``KLDivLoss(reduction="batchmean")``, K times the weight).
- **FIE** (interaction enhancement): the cosine similarities of field pairs (upper triangle) pass through a
  learnable linear adaptor into one weight per pair, ``w = A s + b`` (``adaptor=full``, the paper's); the logit
  gains ``lambda_llm * sum_{i<j} w_ij <e_i, e_j>``, a real pairwise term of the input. A full ``A`` and ``b``
  reach any pair weights whatever ``s`` is, so ``adaptor=scalar`` (``w = alpha s + beta``, two numbers) is
  the variant where the similarities must carry the signal.

No language model runs at training or serving time: the online cost is O(K^2 D) arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from recsys.data.batch import Batch
from recsys.data.schema import PreparedSchema
from recsys.methods.registry import MethodSpec, Upstream, register
from recsys.models.base import Backbone, CTROutput
from recsys.train.config import ConfigError
from recsys.train.task import Task

if TYPE_CHECKING:
    from recsys.experiment import ExperimentConfig


class Reduction(StrEnum):
    FIELD_MEAN = "field_mean"  # per row, the mean of the K fields' KLs
    SUM = "sum"  # per row, their sum: the reference's KLDivLoss(reduction="batchmean") over [B, K, D]


class Adaptor(StrEnum):
    FULL = "full"  # w = A s + b, A a full P x P matrix (the paper's)
    SCALAR = "scalar"  # w = alpha s + beta: the similarities must carry the signal


@dataclass
class LLaCTRConfig:
    field_table: str = ""  # feature table of the K field names (python -m embedding_jobs.run --entity field)
    fre: bool = True  # representation enhancement (KL regulariser)
    fie: bool = True  # interaction enhancement (similarity-weighted pairwise term)
    lambda_loss: float = 0.01  # weight of the FRE loss
    lambda_llm: float = 1.0  # weight of the FIE term in the logit
    fre_reduction: Reduction = Reduction.FIELD_MEAN  # how a row's K field KLs combine (sum: the reference's)
    adaptor: Adaptor = Adaptor.FULL  # full: w = A s + b; scalar: w = alpha s + beta
    # Subtract the mean of the K field vectors before use: a decoder's last-token states share one dominant
    # direction (SmolLM2's field pairs all have cosine 0.82-0.98), so their raw similarities are nearly constant.
    center_fields: bool = False

    def __post_init__(self) -> None:  # built in code with plain strings: the same enums, or a clear error
        self.fre_reduction, self.adaptor = Reduction(self.fre_reduction), Adaptor(self.adaptor)


def field_kl(field_proj: torch.Tensor, emb: torch.Tensor, reduction: Reduction = Reduction.FIELD_MEAN) -> torch.Tensor:
    """Per row, KL(softmax(field_proj[k]) || softmax(emb[b, k])) over the last dim, combined over the fields.

    ``field_proj``: [K, D]; ``emb``: [B, K, D]. Returns a per-row vector [B]: the mean over fields, or with
    ``reduction=sum`` their sum (whose mean over rows is ``KLDivLoss(reduction="batchmean")``).
    """
    log_p = F.log_softmax(field_proj, dim=-1).unsqueeze(0)  # [1, K, D]
    log_q = F.log_softmax(emb, dim=-1)  # [B, K, D]
    per_field = (log_p.exp() * (log_p - log_q)).sum(-1)
    return per_field.sum(-1) if reduction is Reduction.SUM else per_field.mean(-1)


class FieldInteraction(nn.Module):
    """FIE: ``scale * sum_{i<j} w_ij <e_i, e_j>`` with ``w = adaptor(cosine similarities of the field embeddings)``.

    With ``W`` the symmetric, zero-diagonal K x K matrix of the pair weights, the term is
    ``scale/2 * sum_{k,l} W_kl <e_k, e_l>``. Two equal ways to compute it, each the cheaper where it is used:

    - training: ``scale/2 * <Gram(e), W>``, one batched Gram matrix per row; the pair weights' gradient is
      then a single product ``Gram^T g`` (``W @ e`` would need a batched matmul per row in the backward);
    - serving (eval mode): ``sum(e * (W' e))`` with ``W' = scale/2 * W`` computed once; with no gradient it
      is the fastest form at every batch size.
    """

    def __init__(self, field_emb: torch.Tensor, scale: float = 1.0, adaptor: Adaptor = Adaptor.FULL) -> None:
        super().__init__()
        k = field_emb.shape[0]
        i, j = torch.triu_indices(k, k, offset=1)
        unit = F.normalize(field_emb.float(), dim=-1)
        self.register_buffer("similarity", (unit[i] * unit[j]).sum(-1))  # [P] fixed
        self.register_buffer("left", i)
        self.register_buffer("right", j)
        # scalar: alpha and beta as a 1 -> 1 linear map applied to every similarity
        self.adaptor = nn.Linear(len(i), len(i)) if adaptor is Adaptor.FULL else nn.Linear(1, 1)
        self.num_fields, self.scale = k, scale
        self._serving_matrix: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # start as the identity, so the first weights are the similarities themselves
        nn.init.eye_(self.adaptor.weight)
        nn.init.zeros_(self.adaptor.bias)

    def pair_weights(self) -> torch.Tensor:
        if self.adaptor.in_features == 1:  # scalar: w = alpha s + beta
            return self.adaptor(self.similarity.unsqueeze(-1)).squeeze(-1)
        return self.adaptor(self.similarity)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:  # emb: [B, K, D] -> [B]
        if not self.training:
            if self._serving_matrix is None:
                self._serving_matrix = self.half_matrix().detach()
            return (emb * torch.matmul(self._serving_matrix, emb)).sum(dim=(1, 2))
        gram = torch.bmm(emb, emb.transpose(1, 2))  # [B, K, K]
        return gram.flatten(1) @ self.half_matrix().flatten()

    def half_matrix(self) -> torch.Tensor:
        """``scale/2 * W``: what both forms of the term multiply by."""
        return 0.5 * self.scale * self.pair_matrix()

    def pair_matrix(self) -> torch.Tensor:
        """W: the pair weights as a symmetric, zero-diagonal K x K matrix."""
        w = self.pair_weights()
        k = self.num_fields
        upper = torch.zeros(k, k, dtype=w.dtype, device=w.device).index_put((self.left, self.right), w)
        return upper + upper.T

    def train(self, mode: bool = True) -> FieldInteraction:
        self._serving_matrix = None  # weights may change (training, a loaded checkpoint): recompute
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._serving_matrix = None  # new weights loaded in eval mode: recompute on the next call
        super()._load_from_state_dict(*args, **kwargs)


class LLaCTRTask(Task):
    """A backbone plus FRE and FIE; the loss is BCE + lambda_loss * FRE.

    Example::

        field_emb = load_feature_table(path, expect_fingerprint=schema.fingerprint, expect_entity="field").embeddings
        task = LLaCTRTask(build_backbone("dcnv2", schema, 16), field_emb, LLaCTRConfig())
        loss, step = task(batch)
    """

    def __init__(self, model: Backbone, field_emb: torch.Tensor, cfg: LLaCTRConfig) -> None:
        super().__init__(model)
        k = model.sparse_arch.num_fields
        if field_emb.shape[0] != k:
            raise ValueError(f"the field table has {field_emb.shape[0]} rows but the dataset has {k} fields "
                             f"({model.sparse_arch.field_names}): was it made for another dataset?")
        self.cfg, self.num_fields = cfg, k
        # Built on the real device (not meta): DistributedModelParallel would zero a meta buffer.
        self.register_buffer("field_emb", field_emb.float().clone())
        self.projection = nn.Linear(field_emb.shape[1], model.embedding_dim) if cfg.fre else None
        self.interaction = FieldInteraction(field_emb, cfg.lambda_llm, cfg.adaptor) if cfg.fie else None

    def output(self, batch: Batch) -> CTROutput:
        """The backbone's output with FIE added to the logit (the served logit); FRE only shapes training."""
        out = self.model(batch)
        emb, logit = out.field_embeddings, out.logit
        if self.model.num_extra_fields:  # fixed at build time, so the fx trace sees no branch on data
            emb = emb[:, : self.num_fields]
        if self.interaction is not None:
            logit = logit + self.interaction(emb)  # lambda_llm is the interaction's scale
        return CTROutput(logit=logit, representation=out.representation, field_embeddings=emb)

    def extra_losses(self, batch: Batch, out: CTROutput) -> dict[str, tuple[float, torch.Tensor]]:
        if self.projection is None:
            return {}
        kl = field_kl(self.projection(self.field_emb), out.field_embeddings, self.cfg.fre_reduction)
        return {"fre": (self.cfg.lambda_loss, kl)}


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------
FIELD_TABLE_HINT = ("make it with `python -m embedding_jobs.field_finetune ...` then "
                    "`python -m embedding_jobs.run --entity field ...`")


def _needs(cfg: ExperimentConfig) -> list[Upstream]:
    return [Upstream("method.llactr.field_table", cfg.method.llactr.field_table, "the field feature table",
                     FIELD_TABLE_HINT)]


def _build(schema: PreparedSchema, cfg: ExperimentConfig, device: torch.device | None) -> Task:
    from recsys.features import load_feature_table

    backbone = cfg.model.build(schema, device)
    table = load_feature_table(cfg.method.llactr.field_table, expect_fingerprint=schema.fingerprint,
                               expect_entity="field", num_rows=len(schema.fields))
    # the table is keyed by schema position; the sparse arch orders sparse fields before dense ones
    position = {f.name: i for i, f in enumerate(schema.fields)}
    order = [position[name] for name in backbone.sparse_arch.field_names]
    field_emb = table.embeddings[order]
    if cfg.method.llactr.center_fields:
        field_emb = field_emb - field_emb.mean(dim=0, keepdim=True)
    return LLaCTRTask(backbone, field_emb, cfg.method.llactr)


def _check(cfg: ExperimentConfig, schema: PreparedSchema | None) -> None:
    c = cfg.method.llactr
    if c.lambda_loss < 0:
        raise ConfigError(f"method.llactr.lambda_loss={c.lambda_loss}: must be >= 0")


SPEC = register(MethodSpec(name="llactr", summary="field-level language-model knowledge (LLaCTR)", build=_build,
                           section="llactr", config=LLaCTRConfig, check=_check, needs=_needs))
