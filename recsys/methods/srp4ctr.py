"""SRP4CTR (Han et al., Meituan, arXiv 2407.19658): sequential pre-training with side information, then the
pre-trained knowledge enters any backbone through a target-item cross-attention and a querying transformer.

Sequences are the prepared dataset's histories (DESIGN contract 1): at each position the item (``hist_item_id``,
sharing ``item_id``'s embedding table) and its side fields (``hist_genre``: item-side, it shares an item
field's vocabulary; ``hist_rating``: behaviour-side, the user's own action), strictly earlier than the row
(preparation guarantees it and ``tests/test_data.py`` checks it), oldest first. They are read position by
position through TorchRec's EmbeddingCollection (``SparseArch(sequence_fields=...)``).

Stages:

1. ``pretrain`` (``pretrain=true``): FG-BERT-style masked behaviour modelling. Each position is the sum of its
   item and side-field embeddings (``combine=sum``) or their concatenation projected to D (``concat``), plus a
   position embedding, through a bidirectional transformer. A share ``mask_ratio`` of the real positions is
   masked, each one either item-side (the item id and its item-side fields are replaced by learned mask
   vectors; ``item_side_share``) or behaviour-side (the behaviour fields are). The encoder predicts every
   masked field: the item over the item vocabulary (a full softmax, or above ``sampled_softmax_above`` items a
   softmax over the target and shared uniform negatives) and each side field over its vocabulary. Validation:
   masked-item hit rate at 10 and side-field accuracy.
2. ``ctr``: the backbone, with the encoder's output of the row's history entering it as extra fields: a
   cross-attention block (the candidate item's embedding as the query, ``cross=true``) and a Q-Former (``queries``
   learnable queries, ``queries=0``: none). The encoder is frozen (``freeze_encoder``): its output of a history
   does not depend on the candidate, so a serving system computes it once per user and caches it; scoring a
   candidate then costs the cross-attention and the Q-Former.

``pretrain=false`` is the control: the same architecture with a randomly initialised encoder.

``pretrained_run`` points at a finished SRP4CTR run: this run skips its own pre-training and starts from that
run's pre-trained encoder and sequence embedding tables (its ``stages/pretrain`` best checkpoint), the
method's promise that one pre-training serves any production model. The architecture of the encoder
(``combine``, ``layers``, ``heads``) and ``model.embedding_dim`` must match; the backbone may differ.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from recsys.data.batch import Batch
from recsys.data.schema import PAD_ID, Entity, FieldKind, PreparedSchema
from recsys.features.reader import table_files
from recsys.methods.registry import MethodSpec, register
from recsys.methods.srp4ctr_cache import HistoryCache, encoder_hash, history_keys, load_history_cache
from recsys.models.base import Backbone, CTROutput
from recsys.modules.sequence import CrossAttention, QFormer, SequenceEncoder
from recsys.train.config import ConfigError
from recsys.train.evaluation import Evaluator, RatioEvaluator
from recsys.train.task import CTR_STAGE, Stage, Task, TaskOutput

if TYPE_CHECKING:
    from recsys.experiment import ExperimentConfig

PRETRAIN = Stage("pretrain", monitor="item_hit10", mode="max", kind="pretrain")
IGNORE = -100


class Combine(StrEnum):
    SUM = "sum"
    CONCAT = "concat"


@dataclass
class SRP4CTRConfig:
    pretrain: bool = True  # false: the same architecture, encoder not pre-trained (the control)
    layers: int = 2
    heads: int = 2
    dropout: float = 0.1
    combine: Combine = Combine.SUM  # how a position's item and side-field embeddings become one vector
    mask_ratio: float = 0.2  # share of the real positions masked in pre-training
    item_side_share: float = 0.5  # of those, the share masked item-side (the rest behaviour-side)
    sampled_softmax_above: int = 50_000  # item vocabularies larger than this use a sampled softmax
    negatives: int = 1024  # uniform negatives of the sampled softmax, shared by the batch
    cross: bool = True  # the candidate item attends to the encoded history (one extra field)
    queries: int = 2  # Q-Former queries (K extra fields); 0: no Q-Former
    qformer_layers: int = 2
    freeze_encoder: bool = True  # in fine-tuning: what a cache of per-user encodings would serve
    pretrained_run: str = ""  # a finished SRP4CTR run whose pre-trained encoder this run starts from

    def __post_init__(self) -> None:
        self.combine = Combine(self.combine)


@dataclass(frozen=True)
class SequenceFields:
    """Which fields make a behaviour sequence: the item field, its history, and the side histories."""

    item: str  # the candidate's field, e.g. item_id
    item_history: str  # e.g. hist_item_id (shares item's table)
    item_side: tuple[str, ...]  # histories of item attributes, e.g. hist_genre
    behaviour: tuple[str, ...]  # histories of the user's actions, e.g. hist_rating
    length: int

    @property
    def all(self) -> tuple[str, ...]:
        return (self.item_history, *self.item_side, *self.behaviour)


def sequence_fields(schema: PreparedSchema) -> SequenceFields:
    """Find the item history and its side histories in a prepared schema, or say what is missing."""
    by_name = {f.name: f for f in schema.fields}
    seqs = [f for f in schema.fields if f.kind is FieldKind.SEQUENCE]
    item = next((f for f in schema.fields if f.kind is FieldKind.CATEGORICAL and f.entity is Entity.ITEM
                 and f.table == f.name and any(s.table == f.name for s in seqs)), None)
    if item is None:
        raise ConfigError(f"dataset {schema.name!r} has no history of item ids (a sequence field sharing an item "
                          "field's vocabulary); it was prepared without timestamps, or its schema has no "
                          "sequence fields. SRP4CTR needs time-ordered behaviour sequences")
    history = next(s for s in seqs if s.table == item.name)
    side = [s for s in seqs if s is not history and s.max_length == history.max_length]
    item_side = tuple(s.name for s in side if s.table in by_name and by_name[s.table].entity is Entity.ITEM
                      and by_name[s.table].kind is not FieldKind.SEQUENCE)
    behaviour = tuple(s.name for s in side if s.name not in item_side)
    if not history.max_length:
        raise ConfigError(f"{history.name}: a sequence of length 0 cannot be encoded")
    return SequenceFields(item.name, history.name, item_side, behaviour, history.max_length)


@torch.fx.wrap  # the batch's ids per position, padded like the embeddings (a leaf of the pipeline's trace)
def padded_ids(batch: Batch, name: str, length: int) -> torch.Tensor:
    jt = batch.sparse_features[name]
    return jt.to_padded_dense(desired_length=length, padding_value=PAD_ID)


def choose_masks(mask: torch.Tensor, fields: SequenceFields, ratio: float, item_side_share: float,
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Per sequence field, the positions pre-training masks: a share ``ratio`` of the real positions, each
    item-side (the item and its item-side fields) with probability ``item_side_share``, else behaviour-side."""
    chosen = (torch.rand(mask.shape, generator=generator, device=mask.device) < ratio) & mask
    item_side = torch.rand(mask.shape, generator=generator, device=mask.device) < item_side_share
    masks = {name: chosen & item_side for name in (fields.item_history, *fields.item_side)}
    return masks | {name: chosen & ~item_side for name in fields.behaviour}


class FGBert(nn.Module):
    """The sequence encoder with its pre-training heads. Called through ``forward`` only (``what``: "encode" or
    "pretrain"), so that the train pipeline's fx trace sees one leaf call."""

    def __init__(self, dim: int, fields: SequenceFields, vocab: dict[str, int], cfg: SRP4CTRConfig) -> None:
        super().__init__()
        self.fields, self.cfg = fields, cfg
        self.combine = (nn.Linear(len(fields.all) * dim, dim) if cfg.combine is Combine.CONCAT else None)
        self.encoder = SequenceEncoder(dim, fields.length, cfg.layers, cfg.heads, cfg.dropout)
        self.mask_vectors = nn.ParameterDict({f: nn.Parameter(torch.randn(dim) * 0.02) for f in fields.all})
        self.heads = nn.ModuleDict({f: nn.Linear(dim, vocab[f]) for f in fields.all})
        self.vocab = vocab
        self.eval_generator: torch.Generator | None = None

    def reset_eval_masks(self, seed: int = 0) -> None:
        """Validation masks the same positions every pass (a fixed generator), so epochs compare."""
        self.eval_generator = torch.Generator().manual_seed(seed)

    def _inputs(self, seqs: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [seqs[f] for f in self.fields.all]
        return self.combine(torch.cat(parts, dim=-1)) if self.combine is not None else torch.stack(parts).sum(0)

    def forward(self, what: str, seqs: dict[str, torch.Tensor], mask: torch.Tensor,
                ids: dict[str, torch.Tensor] | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
        if what == "encode":
            return self.encoder(self._inputs(seqs), mask)
        return self._pretrain(seqs, mask, ids)

    def _pretrain(self, seqs: dict[str, torch.Tensor], mask: torch.Tensor,
                  ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The masked-field loss summed over masked positions, and per field its hits (top 10 for the item,
        top 1 for a side field) and masked positions."""
        f = self.fields
        masked_by = choose_masks(mask, f, self.cfg.mask_ratio, self.cfg.item_side_share,
                                 None if self.training else self.eval_generator)
        inputs = {name: torch.where(masked_by[name].unsqueeze(-1), self.mask_vectors[name].expand_as(x), x)
                  for name, x in seqs.items()}
        hidden = self.encoder(self._inputs(inputs), mask)
        loss = hidden.new_zeros(())
        stats = {}
        for name in f.all:
            where = masked_by[name]
            target = ids[name][where]
            logits = self.heads[name](hidden[where])
            if name == f.item_history and self.vocab[name] > self.cfg.sampled_softmax_above:
                loss = loss + self._sampled(hidden[where], target)
            else:
                loss = loss + F.cross_entropy(logits, target, reduction="sum")
            k = min(10, logits.shape[-1]) if name == f.item_history else 1
            hits = (logits.topk(k, dim=-1).indices == target.unsqueeze(-1)).any(-1).sum()
            stats[f"{name}_hits"], stats[f"{name}_masked"] = hits.float(), where.sum().float()
        return {"loss_sum": loss, **stats}

    def _sampled(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Softmax over each target and ``negatives`` uniform items shared by the batch (log-uniform correction is
        not needed: the proposal is uniform, so it cancels)."""
        head = self.heads[self.fields.item_history]
        negatives = torch.randint(1, self.vocab[self.fields.item_history], (self.cfg.negatives,), device=hidden.device)
        candidates = torch.cat([target.unsqueeze(1), negatives.expand(len(target), -1)], dim=1)
        logits = (hidden.unsqueeze(1) * head.weight[candidates]).sum(-1) + head.bias[candidates]
        collides = torch.cat([torch.zeros_like(target, dtype=torch.bool).unsqueeze(1),
                              candidates[:, 1:] == target.unsqueeze(1)], dim=1)  # a negative that is the target
        return F.cross_entropy(logits.masked_fill(collides, float("-inf")), torch.zeros_like(target), reduction="sum")


class SRP4CTRTask(Task):
    """A backbone whose extra fields come from the pre-trained encoder of the row's history."""

    def __init__(self, model: Backbone, fgbert: FGBert, fields: SequenceFields, item_index: int,
                 cfg: SRP4CTRConfig, stages: tuple[Stage, ...]) -> None:
        super().__init__(model, stages)
        self.fgbert, self.fields, self.item_index, self.cfg = fgbert, fields, item_index, cfg
        d = model.embedding_dim
        self.cross = CrossAttention(d, cfg.heads) if cfg.cross else None
        self.qformer = QFormer(d, cfg.queries, cfg.qformer_layers, cfg.heads) if cfg.queries else None
        self.cache: HistoryCache | None = None
        self.pretrained_run = cfg.pretrained_run
        self.set_stage(self.stage)  # which parameters train, before DistributedModelParallel wraps the task

    def _sequences(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        emb, seqs = self.model.sparse_arch.embed(batch)
        mask = seqs[self.fields.item_history][1]
        return emb, {name: seqs[name][0] for name in self.fields.all}, mask

    def warm_start(self) -> dict[str, tuple[str, str]]:
        """The encoder and the sequence tables it was pre-trained with come from ``pretrained_run``."""
        if not self.pretrained_run:
            return {}
        best = str(pretrained_checkpoint(self.pretrained_run))
        return {prefix: (best, prefix) for prefix in ("fgbert.", "model.sparse_arch.ec.")}

    def use_cache(self, cache: HistoryCache | None) -> None:
        """Read the encoder's output from cached encodings (``embedding_jobs.history_encodings``) instead of
        running the encoder: what serving does. ``None`` runs the encoder again."""
        if cache is not None and self.stage is not CTR_STAGE:
            raise ValueError("a history cache serves the fine-tuned model (the ctr stage), not pre-training")
        self.cache = cache

    def encode(self, batch: Batch, seqs: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """``[B, L, D]``: the encoder's output of each row's history, computed or read from the cache."""
        if self.cache is not None:
            return self.cache.lookup(history_keys([padded_ids(batch, n, self.fields.length) for n in self.fields.all]))
        return self.fgbert("encode", seqs, mask)

    def output(self, batch: Batch) -> CTROutput:
        emb, seqs, mask = self._sequences(batch)
        encoded = self.encode(batch, seqs, mask)
        extra = []
        if self.cross is not None:
            extra.append(self.cross(emb[:, self.item_index], encoded, mask).unsqueeze(1))
        if self.qformer is not None:
            extra.append(self.qformer(encoded, mask))
        return self.model.from_embeddings(emb, batch, torch.cat(extra, dim=1))

    def stage_forward(self, batch: Batch) -> TaskOutput:
        emb, seqs, mask = self._sequences(batch)
        ids = {name: padded_ids(batch, name, self.fields.length) for name in self.fields.all}
        result = self.fgbert("pretrain", seqs, mask, ids)
        count = sum(result[f"{name}_masked"] for name in self.fields.all)
        loss = result["loss_sum"] / count.clamp(min=1)
        out = {"loss": loss.detach(), "weights": batch.weights, "loss_sum": result["loss_sum"].detach(), "masked": count}
        for name in self.fields.all:
            out[f"{name}_hits"], out[f"{name}_masked"] = result[f"{name}_hits"], result[f"{name}_masked"]
        return loss, out

    def train(self, mode: bool = True) -> SRP4CTRTask:
        super().train(mode)
        if self.cfg.freeze_encoder and self.stage is CTR_STAGE and self.fgbert is not None:
            self.fgbert.train(False)  # a frozen encoder encodes as it would for a cache (no dropout)
        return self

    def set_stage(self, stage: Stage) -> None:
        super().set_stage(stage)
        frozen = self.cfg.freeze_encoder and stage is CTR_STAGE
        for name, p in self.fgbert.named_parameters():
            if not name.startswith("heads.") and not name.startswith("mask_vectors."):
                p.requires_grad_(not frozen)
        for p in (*self.fgbert.heads.parameters(), *self.fgbert.mask_vectors.parameters()):
            p.requires_grad_(stage is PRETRAIN)

    def evaluator(self, stage: Stage, split_file: Path | None = None) -> Evaluator:
        if stage.kind == "ctr":
            return super().evaluator(stage, split_file)
        self.fgbert.reset_eval_masks()
        f = self.fields
        ratios = {"loss": ("loss_sum", "masked"), "item_hit10": (f"{f.item_history}_hits", f"{f.item_history}_masked")}
        ratios |= {f"{name}_accuracy": (f"{name}_hits", f"{name}_masked") for name in (*f.item_side, *f.behaviour)}
        return RatioEvaluator(ratios)


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------
def pretrained_checkpoint(run: str | Path) -> Path:
    """The best checkpoint of ``run``'s pre-training stage, or a clear error naming what is missing."""
    best = Path(run) / "stages" / PRETRAIN.name / "checkpoints" / "best"
    if not best.is_dir():
        raise ConfigError(f"method.srp4ctr.pretrained_run={run}: no pre-training checkpoint at {best} "
                          "(is it a finished SRP4CTR run with pretrain=true?)")
    return best


def _check(cfg: ExperimentConfig, schema: PreparedSchema | None) -> None:
    c = cfg.method.srp4ctr
    if c.pretrained_run:
        if not c.pretrain:
            raise ConfigError("method.srp4ctr: pretrained_run starts from a pre-trained encoder; "
                              "pretrain=false (the control) contradicts it")
        pretrained_checkpoint(c.pretrained_run)
    if not c.cross and c.queries == 0:
        raise ConfigError("method.srp4ctr: cross=false and queries=0 leave nothing for the encoder to feed the "
                          "backbone; enable the cross-attention or give the Q-Former K >= 1 queries")
    if c.queries < 0 or not 0 < c.mask_ratio < 1 or not 0 <= c.item_side_share <= 1:
        raise ConfigError("method.srp4ctr: queries >= 0, 0 < mask_ratio < 1 and 0 <= item_side_share <= 1")
    if cfg.model.embedding_dim % c.heads:
        raise ConfigError(f"method.srp4ctr.heads={c.heads} must divide model.embedding_dim={cfg.model.embedding_dim}")
    if schema is not None:
        sequence_fields(schema)


def _build(schema: PreparedSchema, cfg: ExperimentConfig, device: torch.device | None) -> Task:
    c = cfg.method.srp4ctr
    fields = sequence_fields(schema)
    backbone = cfg.model.build(schema, device, num_extra_fields=int(c.cross) + c.queries,
                               sequence_fields=fields.all)
    vocab = {name: schema.field(name).vocab_size for name in fields.all}
    fgbert = FGBert(cfg.model.embedding_dim, fields, vocab, c)
    item_index = backbone.sparse_arch.sparse_names.index(fields.item)
    own_pretraining = c.pretrain and not c.pretrained_run
    stages = ((PRETRAIN,) if own_pretraining else ()) + (CTR_STAGE,)
    return SRP4CTRTask(backbone, fgbert, fields, item_index, c, stages)


HISTORY_DIR = "history"  # the export's copy of the history cache


def _cache_for(task: SRP4CTRTask, schema_fingerprint: str, path: str | Path, weights_hash: str) -> HistoryCache:
    return load_history_cache(path, fingerprint=schema_fingerprint, fields=task.fields.all,
                              length=task.fields.length, dim=task.model.embedding_dim, weights_hash=weights_hash)


def _export(task: Task, cfg: ExperimentConfig, folder: Path, inputs: dict[str, str]) -> tuple[dict, dict]:
    """The served model is the backbone, the cross-attention and the Q-Former, reading the encoder's output from
    the history cache (copied into the export); the encoder itself stays behind."""
    assert isinstance(task, SRP4CTRTask)
    path = inputs.get("history_cache")
    if not path:
        raise ConfigError("an SRP4CTR model is served from cached history encodings: make them with `python -m "
                          "embedding_jobs.history_encodings --run RUN --out DIR` and export with --history-cache DIR")
    from recsys.data.schema import PreparedSchema

    weights = encoder_hash(task.fgbert)
    fingerprint = PreparedSchema.load(cfg.data.path).fingerprint
    cache = _cache_for(task, fingerprint, path, weights)  # refuses a cache of another encoder or dataset
    (folder / HISTORY_DIR).mkdir()
    for file in table_files(path):
        shutil.copyfile(file, folder / HISTORY_DIR / file.name)
    state = {k: v for k, v in task.state_dict().items() if not k.startswith("fgbert.")}
    return state, {"encoder_sha256": weights, "histories": len(cache.keys)}


def _load(task: Task, folder: Path, state: dict, meta: dict) -> None:
    assert isinstance(task, SRP4CTRTask)
    missing, unexpected = task.load_state_dict(state, strict=False)
    wrong = [k for k in missing if not k.startswith("fgbert.")] + list(unexpected)
    if wrong:
        raise ValueError(f"{folder / 'model.pt'} does not fit this SRP4CTR model: {wrong[:3]}")
    task.use_cache(_cache_for(task, meta["fingerprint"], folder / HISTORY_DIR, meta["encoder_sha256"]))
    task.fgbert = None  # not part of the served model: its output comes from the cache


SPEC = register(MethodSpec(
    name="srp4ctr", summary="sequential pre-training; cross-attention and a Q-Former feed any backbone (SRP4CTR)",
    build=_build, section="srp4ctr", config=SRP4CTRConfig, check=_check, export_task=_export, load_task=_load))

__all__ = ["SRP4CTRConfig", "SRP4CTRTask", "FGBert", "sequence_fields"]
