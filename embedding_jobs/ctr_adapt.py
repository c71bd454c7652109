"""ELEC stage 1: adapt a language model to the CTR task, on click labels, and save it for the embedding job.

    python -m embedding_jobs.ctr_adapt --dataset runs/data/ml-100k --out runs/models/ml-100k-elec
    python -m embedding_jobs.run --entity user item --dataset runs/data/ml-100k \\
        --out runs/features/ml-100k-elec --model runs/models/ml-100k-elec

Model: two towers sharing one encoder. A training row (user u, item i, label y) is read as the texts of the
embedding job (embedding_jobs.templates: user_texts and item_texts, so exactly the texts the tables embed
later), and

    h(x)   = meanpool(LM(x))                  last hidden states, averaged over the attention mask
    T(z)   = W2 @ gelu(W1 @ z + b1) + b2      the transformation MLP (hidden -> 256 -> 64), both towers
    r_u    = T(h(user text)), r_i = T(h(item text))    the "high-level representation vectors"
    logit  = w @ [r_u, r_i, r_u * r_i] + b    the prediction layer; BCE against y

Two towers, not one text per row, because the CTR model reads the representations from feature tables keyed
by user id and by item id, computed once per id: they must be the very vectors trained here. In a batch
each distinct user and item text is encoded once.

Training, on a seeded sample of --rows training rows (--valid-rows validation rows for the AUCs):

  stage A, head warm start (every --tune): each distinct user and item text of the sampled training and
      validation rows is encoded once by the frozen encoder (eval mode, no gradient, batched, same max
      length), and T and the prediction layer are trained on these cached h(x) over all sampled rows for
      --head-epochs passes (Adam, --head-lr, --head-batch-size rows per step). It costs one encoding pass
      over the distinct texts (MiniLM on one CPU thread: ~37 texts/s, so ML-100K's 2,264 texts of the default
      sample take about a minute, ML-1M's up to ~9,700 about four to five minutes), then seconds of arithmetic.
      Not limited by --time-budget-s.
  stage B, encoder fine-tuning (--tune lora, the default: LoRA via peft; --tune full, alias --full: every
      weight): from the warm-started head, the encoder and the head train together on the same sample, for
      --epochs passes at most, stopping when --time-budget-s is spent (the current step finishes). The time
      budget applies to stage B only. --tune head has no stage B: the saved encoder is the unchanged base model.
      The head learns at --stage-b-head-lr in stage B (default: --head-lr; 0 freezes it, since stage A showed
      the head overfits the sample within a few passes). With --eval-every N the validation AUC is measured
      every N steps; the saved model is the best of stage A, those steps and the end (model selection on
      validation; without --eval-every, the better of stage A and the end).

The language model's own validation AUC is measured with an untrained head (about 0.5; valid_auc_before),
after stage A (valid_auc_head, from the cached vectors) and at the end with the final encoder and head
(valid_auc_after; with --tune head the encoder did not change, so it is the stage-A value).

Written to a temporary folder, then renamed to OUT:
  config.json, model.safetensors, tokenizer  the encoder, LoRA merged (--tune head: the base model unchanged):
                                             a plain Hugging Face model
  elec_head.json                             sizes, pooling, max length and text options of training, formulas
  elec_head/elec_head.safetensors            T (transform.*) and the prediction layer (predict.*)
  report.json                                dataset, base model and hash, options, AUCs, loss history, time:
                                             valid_auc_before/_head/_after, rows_used (sampled training rows
                                             learnt from), steps (stage B steps), seconds (whole run, saving
                                             excluded), head_* (stage A), train_seconds/rows_trained (stage B)

Stored vector: `python -m embedding_jobs.run --model OUT` sees elec_head.json and stores for every user and
item key r = T(meanpool(H)): H the last hidden states of its text cut at the training max length, mean-pooled
over the attention mask, not L2-normalised, then T; dim = --rep-dim; metadata head = "elec_transform".
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from embedding_jobs.elec_head import ELEC_TRANSFORM, STORED_VECTOR, ElecHead, HeadConfig, save_head
from embedding_jobs.field_finetune import PooledEncoder
from embedding_jobs.model_files import (
    ModelError,
    Pooling,
    model_name,
    packaged_minilm,
    read_model_config,
    resolve_model_path,
    setup_job_cli,
    weights_hash,
)
from embedding_jobs.prepared import PreparedData
from embedding_jobs.templates import TemplateOptions, TextTable, item_texts, user_texts
from recsys.atomic import atomic_dir
from recsys.data.sources import DataError
from recsys.train.metrics import auc, logloss

log = logging.getLogger(__name__)

LORA_LR, FULL_LR, HEAD_LR = 5e-4, 1e-4, 1e-3
TUNES = ("lora", "full", "head")  # what stage B trains: LoRA adapters, every encoder weight, or nothing (no stage B)


@dataclass(frozen=True)
class AdaptOptions:
    dataset: Path
    out: Path
    model: Path
    rows: int = 20_000  # training rows sampled (seeded)
    valid_rows: int = 2_000  # validation rows sampled (seeded), for the AUC before and after
    epochs: int = 1  # stage B: passes over the sample at most
    time_budget_s: float | None = 300.0  # stage B stops after this long (stage A, evaluation, saving come on top)
    batch_size: int = 32  # stage B: rows per step
    lr: float | None = None  # encoder; None: LORA_LR with LoRA, FULL_LR with full fine-tuning
    head_lr: float = HEAD_LR  # the transformation MLP and the prediction layer, in both stages
    stage_b_head_lr: float | None = None  # the head in stage B; None: head_lr; 0: frozen
    eval_every: int = 0  # stage B: validation AUC every this many steps, the best step kept (0: at the end only)
    tune: str = "lora"  # stage B: "lora", "full" or "head" (no stage B: the encoder stays the base model)
    head_epochs: int = 20  # stage A: passes over the sample with the frozen encoder's cached vectors (0: none)
    head_batch_size: int = 1024  # stage A: rows per step
    encode_batch_size: int = 64  # texts per forward pass when encoding without gradient (stage A, evaluation)
    lora_rank: int = 8
    hidden_dim: int = 256
    rep_dim: int = 64
    max_length: int = 128  # tokens per text (CPU-friendly); the embedding job cuts at the same length
    # no outcomes in the user texts: they are built from training rows, so outcomes would hand the model the
    # labels of the very rows it trains on (measured: the gain network then fell far below the base)
    templates: TemplateOptions = TemplateOptions(history_outcomes=False)
    trust_remote_code: bool = False
    seed: int = 0
    overwrite: bool = False

    @property
    def lora(self) -> bool:
        return self.tune == "lora"

    @property
    def trains_encoder(self) -> bool:
        """Whether there is a stage B (encoder fine-tuning)."""
        return self.tune != "head"

    @property
    def encoder_lr(self) -> float | None:
        if not self.trains_encoder:
            return None
        return self.lr if self.lr is not None else LORA_LR if self.lora else FULL_LR

    def check(self) -> None:
        if self.tune not in TUNES:
            raise ValueError(f"tune must be one of {', '.join(TUNES)}, got {self.tune!r}")
        for name in ("rows", "valid_rows", "epochs", "batch_size", "head_batch_size", "encode_batch_size",
                     "lora_rank", "hidden_dim", "rep_dim", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("head_epochs", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.stage_b_head_lr is not None and self.stage_b_head_lr < 0:
            raise ValueError(f"stage_b_head_lr must be >= 0, got {self.stage_b_head_lr}")


@dataclass(frozen=True)
class Rows:
    """Sampled rows of one split: user and item key ids and the click label."""

    users: np.ndarray  # int64
    items: np.ndarray  # int64
    labels: np.ndarray  # float32

    def __len__(self) -> int:
        return len(self.labels)


def entity_texts(data: PreparedData, templates: TemplateOptions) -> tuple[dict[int, str], dict[int, str]]:
    """(user key -> text, item key -> text): the embedding job's texts, so training sees what tables store."""
    try:
        users, items = user_texts(data, templates), item_texts(data, templates)
    except DataError as e:
        raise DataError(f"ELEC adaptation reads every row as user text + item text, so the dataset needs a user key "
                        f"field ({templates.user_key_field!r}) and an item key field ({templates.item_key_field!r}): "
                        f"{e}") from None
    return _by_key(users), _by_key(items)


def _by_key(table: TextTable) -> dict[int, str]:
    return dict(zip(table.keys.tolist(), table.texts, strict=True))


def sample_rows(data: PreparedData, split: str, n: int, seed: int, templates: TemplateOptions,
                users: dict[int, str], items: dict[int, str]) -> Rows:
    """A seeded sample of ``n`` rows of ``split`` whose user and item have a text (padding/unknown ids do not)."""
    label = data.schema.label
    table = data.read_split(split, [templates.user_key_field, templates.item_key_field, label])
    u, i = (table.column(c).to_numpy().astype(np.int64) for c in (templates.user_key_field, templates.item_key_field))
    keep = np.flatnonzero(np.isin(u, list(users)) & np.isin(i, list(items)))
    if len(keep) < len(u):
        log.info("%s: %d of %d rows have an unknown user or item (no text) and are left out", split,
                 len(u) - len(keep), len(u))
    if len(keep) > n:
        keep = np.sort(np.random.default_rng(seed).choice(keep, n, replace=False))
    return Rows(u[keep], i[keep], table.column(label).to_numpy()[keep].astype(np.float32))


@dataclass(frozen=True)
class PooledCache:
    """meanpool(H) of distinct keys' texts, each encoded once: ``vectors[k]`` belongs to ``keys[k]``."""

    keys: np.ndarray  # int64, sorted and distinct
    vectors: torch.Tensor  # [len(keys), hidden]

    def positions(self, keys: np.ndarray) -> torch.Tensor:
        """Rows of ``vectors`` that hold ``keys`` (every one of which must be cached)."""
        pos = np.searchsorted(self.keys, keys)
        if len(self.keys) == 0 or not np.array_equal(self.keys[np.minimum(pos, len(self.keys) - 1)], keys):
            raise KeyError("keys missing from the cache of encoded texts")
        return torch.from_numpy(pos.astype(np.int64))

    def __getitem__(self, keys: np.ndarray) -> torch.Tensor:
        return self.vectors[self.positions(keys)]


class ElecModel:
    """The language model under adaptation: a mean-pooling encoder (LoRA-wrapped, fully trainable or frozen) and
    the ELEC head."""

    def __init__(self, folder: Path, opts: AdaptOptions) -> None:
        self.encoder = PooledEncoder(folder, opts.max_length, opts.lora_rank if opts.lora else None,
                                     pooling=Pooling.MEAN, normalize=False, trust_remote_code=opts.trust_remote_code)
        if not opts.trains_encoder:
            self.encoder.model.requires_grad_(False)
        self.head = ElecHead(read_model_config(folder).hidden_size, opts.hidden_dim, opts.rep_dim)

    def train(self, mode: bool = True) -> None:
        self.encoder.model.train(mode)
        self.head.train(mode)

    def pooled(self, texts: list[str]) -> torch.Tensor:
        """meanpool(H): what the engines return for this model before the head."""
        return self.encoder.encode(texts)

    def represent(self, texts: list[str]) -> torch.Tensor:
        """r = T(meanpool(H)): the vector the embedding job stores."""
        return self.head.transform(self.pooled(texts))

    def logits(self, rows: Rows, idx: np.ndarray, users: dict[int, str], items: dict[int, str]) -> torch.Tensor:
        """Click logits of ``rows[idx]``, each distinct user and item text encoded once."""
        r_u = self._represent_keys(rows.users[idx], users)
        r_i = self._represent_keys(rows.items[idx], items)
        return self.head(r_u, r_i)

    def _represent_keys(self, keys: np.ndarray, texts: dict[int, str]) -> torch.Tensor:
        distinct, inverse = np.unique(keys, return_inverse=True)
        reps = self.represent([texts[int(k)] for k in distinct])
        return reps[torch.from_numpy(inverse.reshape(-1))]

    @torch.no_grad()
    def encode_keys(self, keys: np.ndarray, texts: dict[int, str], batch_size: int, bar: tqdm | None = None
                    ) -> PooledCache:
        """meanpool(H) of each distinct key's text, in eval mode without gradient, in batches of similar length
        (longest first: little padding). The encoder's train/eval mode is restored afterwards."""
        distinct = np.unique(keys)
        order = np.argsort([-len(texts[int(k)]) for k in distinct], kind="stable")
        vectors = torch.empty(len(distinct), self.head.transform[0].in_features)
        training = self.encoder.model.training
        self.encoder.model.eval()
        try:
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                vectors[torch.from_numpy(idx)] = self.pooled([texts[int(k)] for k in distinct[idx]])
                if bar is not None:
                    bar.update(len(idx))
        finally:
            self.encoder.model.train(training)
        return PooledCache(distinct, vectors)

    @torch.no_grad()
    def evaluate_cached(self, rows: Rows, users: PooledCache, items: PooledCache) -> dict[str, float]:
        """AUC and log loss of the head on cached meanpool(H) vectors."""
        self.head.eval()
        logits = self.head(self.head.transform(users[rows.users]), self.head.transform(items[rows.items]))
        y = torch.from_numpy(rows.labels)
        return {"auc": auc(logits, y), "logloss": logloss(torch.sigmoid(logits), y)}

    def evaluate(self, rows: Rows, users: dict[int, str], items: dict[int, str], batch_size: int = 64,
                 progress: bool = False) -> dict[str, float]:
        """AUC and log loss with the current encoder and head: every distinct text of ``rows`` encoded afresh."""
        self.train(False)
        total = len(np.unique(rows.users)) + len(np.unique(rows.items))
        with tqdm(total=total, desc="validation: encoding texts", unit="text", disable=not progress) as bar:
            u, i = self.encode_keys(rows.users, users, batch_size, bar), self.encode_keys(rows.items, items,
                                                                                           batch_size, bar)
        return self.evaluate_cached(rows, u, i)

    def save(self, out: Path, config: HeadConfig) -> None:
        """The encoder with LoRA merged (a plain Hugging Face model), and the head beside it."""
        self.encoder.save(out)
        save_head(self.head, config, out)


def warm_start_head(model: ElecModel, train: Rows, valid: Rows, users: dict[int, str], items: dict[int, str],
                    opts: AdaptOptions, progress: bool = True) -> dict:
    """Stage A: encode every distinct user and item text of ``train`` and ``valid`` once with the frozen encoder,
    then train T and the prediction layer on the cached vectors for ``opts.head_epochs`` passes over ``train``.

    Returns the validation metrics with the untrained head (``before``) and after (``head``), the cached
    vectors (``users``, ``items``: PooledCache) and the stage's figures for the report (``stats``)."""
    start = time.perf_counter()
    all_users, all_items = np.concatenate([train.users, valid.users]), np.concatenate([train.items, valid.items])
    n_users, n_items = len(np.unique(all_users)), len(np.unique(all_items))
    with tqdm(total=n_users + n_items, desc="stage A: encoding texts", unit="text", disable=not progress) as bar:
        u = model.encode_keys(all_users, users, opts.encode_batch_size, bar)
        i = model.encode_keys(all_items, items, opts.encode_batch_size, bar)
    encode_s = time.perf_counter() - start
    log.info("stage A: %d texts (%d users, %d items) encoded by the frozen encoder in %.1f s (%.1f texts/s)",
             n_users + n_items, n_users, n_items, encode_s, (n_users + n_items) / max(encode_s, 1e-9))
    before = model.evaluate_cached(valid, u, i)
    log.info("validation AUC of the language model before adaptation: %.4f (untrained head)", before["auc"])

    start = time.perf_counter()
    optimizer = torch.optim.Adam(model.head.parameters(), lr=opts.head_lr)
    rng = np.random.default_rng([opts.seed, 1])
    pos_u, pos_i, y = u.positions(train.users), i.positions(train.items), torch.from_numpy(train.labels)
    history, steps, head = [], 0, before
    best_auc, best_epoch, best_state = before["auc"], 0, copy.deepcopy(model.head.state_dict())
    for epoch in range(opts.head_epochs):
        model.head.train()
        order = torch.from_numpy(rng.permutation(len(train)))
        total = 0.0
        for s in range(0, len(order), opts.head_batch_size):
            idx = order[s:s + opts.head_batch_size]
            r_u, r_i = model.head.transform(u.vectors[pos_u[idx]]), model.head.transform(i.vectors[pos_i[idx]])
            logits = model.head(r_u, r_i)
            loss = F.binary_cross_entropy_with_logits(logits, y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            steps += 1
        head = model.evaluate_cached(valid, u, i)
        history.append({"epoch": epoch + 1, "train_loss": round(total / len(train), 5),
                        "valid_auc": round(head["auc"], 5), "valid_logloss": round(head["logloss"], 5)})
        log.info("stage A epoch %d/%d: training loss %.4f, validation AUC %.4f", epoch + 1, opts.head_epochs,
                 total / len(train), head["auc"])
        if head["auc"] >= best_auc:  # on a tie the later, better-fitted head
            best_auc, best_epoch, best_state = head["auc"], epoch + 1, copy.deepcopy(model.head.state_dict())
    # the head overfits the sample's texts within a few passes: keep the epoch with the best validation AUC
    model.head.load_state_dict(best_state)
    if opts.head_epochs:
        head = model.evaluate_cached(valid, u, i)
        log.info("stage A: keeping the head of epoch %d (best validation AUC)", best_epoch)
    head_s = time.perf_counter() - start
    log.info("stage A: head trained on %d rows x %d epochs (%d steps) in %.1f s; validation AUC %.4f -> %.4f",
             len(train), opts.head_epochs, steps, head_s, before["auc"], head["auc"])
    stats = {"head_texts_encoded": n_users + n_items, "head_users_encoded": n_users, "head_items_encoded": n_items,
             "head_encode_seconds": encode_s, "head_texts_per_second": (n_users + n_items) / max(encode_s, 1e-9),
             "head_epochs": opts.head_epochs, "head_rows": len(train) if opts.head_epochs else 0,
             "head_steps": steps, "head_train_seconds": head_s, "head_best_epoch": best_epoch,
             "head_history": history}
    return {"before": before, "head": head, "users": u, "items": i, "stats": stats}


def stage_b_state(model: ElecModel) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A copy of what stage B changes: the encoder's trainable weights (LoRA's, or all) and the head."""
    encoder = {k: v.detach().clone() for k, v in model.encoder.model.named_parameters() if v.requires_grad}
    return encoder, copy.deepcopy(model.head.state_dict())


def restore_stage_b_state(model: ElecModel, state: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]) -> None:
    encoder, head = state
    params = dict(model.encoder.model.named_parameters())
    with torch.no_grad():
        for k, v in encoder.items():
            params[k].copy_(v)
    model.head.load_state_dict(head)


def train_encoder(model: ElecModel, train: Rows, users: dict[int, str], items: dict[int, str], opts: AdaptOptions,
                  progress: bool = True, evaluate: Callable[[], float] | None = None) -> dict:
    """Stage B: the encoder (LoRA or every weight) and the head together, within ``opts.time_budget_s``.

    With ``opts.eval_every`` and ``evaluate`` (the validation AUC), every that many steps the AUC is measured;
    the result's ``evaluations`` lists them and ``best`` holds the state of the best one (or None)."""
    head_lr = opts.head_lr if opts.stage_b_head_lr is None else opts.stage_b_head_lr
    groups = [{"params": [p for p in model.encoder.model.parameters() if p.requires_grad], "lr": opts.encoder_lr}]
    if head_lr > 0:
        groups.append({"params": model.head.parameters(), "lr": head_lr})
    optimizer = torch.optim.AdamW(groups)
    rng = np.random.default_rng(opts.seed)
    evaluations: list[dict] = []
    best: tuple[float, int, tuple] | None = None  # (auc, step, state)
    losses: list[float] = []
    start, seen, stopped, epochs_started = time.perf_counter(), 0, False, 0
    for epoch in range(opts.epochs):
        model.train()
        epochs_started, first_step = epoch + 1, len(losses)
        order = rng.permutation(len(train))
        bar = tqdm(range(0, len(order), opts.batch_size), desc=f"stage B ({opts.tune}) {epoch + 1}/{opts.epochs}",
                   disable=not progress, unit="step")
        for s in bar:
            idx = order[s:s + opts.batch_size]
            loss = F.binary_cross_entropy_with_logits(model.logits(train, idx, users, items),
                                                      torch.from_numpy(train.labels[idx]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(round(loss.item(), 5))
            seen += len(idx)
            if evaluate is not None and opts.eval_every and len(losses) % opts.eval_every == 0:
                auc = evaluate()
                evaluations.append({"step": len(losses), "rows": seen, "valid_auc": auc})
                log.info("stage B step %d: validation AUC %.4f", len(losses), auc)
                if best is None or auc > best[0]:
                    best = (auc, len(losses), stage_b_state(model))
                model.train()
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", rows_s=f"{seen / elapsed:.1f}")
            if opts.time_budget_s is not None and elapsed > opts.time_budget_s:
                stopped = True
                break
        log.info("stage B epoch %d: %d steps, mean training loss %.4f", epoch + 1, len(losses) - first_step,
                 np.mean(losses[first_step:]))
        if stopped:
            log.info("time budget of %.0f s reached after %d steps (%d rows)", opts.time_budget_s, len(losses), seen)
            break
    train_s = time.perf_counter() - start
    return {"losses": losses, "seen": seen, "stopped": stopped, "epochs_started": epochs_started, "seconds": train_s,
            "evaluations": evaluations, "best": best}


def adapt(opts: AdaptOptions, progress: bool = True) -> dict:
    """Stage A (head warm start), stage B (encoder fine-tuning, unless --tune head), evaluate and save; returns
    the report (also written to OUT/report.json)."""
    opts.check()
    if opts.out.exists() and not opts.overwrite:
        raise FileExistsError(f"{opts.out} exists: pass another --out, or --overwrite to replace it")
    run_start = time.perf_counter()
    base = resolve_model_path(opts.model)
    torch.manual_seed(opts.seed)
    data = PreparedData.open(opts.dataset)
    templates = opts.templates.resolve(data)
    users, items = entity_texts(data, templates)
    train = sample_rows(data, "train", opts.rows, opts.seed, templates, users, items)
    valid = sample_rows(data, "valid", opts.valid_rows, opts.seed + 1, templates, users, items)
    for split, rows in (("train", train), ("valid", valid)):
        if len(np.unique(rows.labels)) < 2:
            raise DataError(f"{opts.dataset}: the {split} sample has {len(rows)} rows with labels "
                            f"{np.unique(rows.labels).tolist()}: it needs clicks and non-clicks")
    log.info("%d training rows (%.1f%% clicks), %d validation rows; %d users and %d items have texts", len(train),
             100 * train.labels.mean(), len(valid), len(users), len(items))
    model = ElecModel(base, opts)
    if opts.trains_encoder:
        log.info("model %s, %s, encoder lr %g, head lr %g", base, f"LoRA rank {opts.lora_rank}" if opts.lora else
                 "full fine-tuning", opts.encoder_lr, opts.head_lr)
    else:
        log.info("model %s, head only (the encoder stays frozen: no stage B), head lr %g", base, opts.head_lr)
        if opts.lr is not None:
            log.warning("--lr %g is ignored: --tune head trains no encoder weight", opts.lr)

    stage_a = warm_start_head(model, train, valid, users, items, opts, progress)
    before, head = stage_a["before"], stage_a["head"]
    kept = "head"
    if opts.trains_encoder:
        head_state = copy.deepcopy(model.head.state_dict())
        stage_b = train_encoder(model, train, users, items, opts, progress,
                                lambda: model.evaluate(valid, users, items, opts.encode_batch_size, False)["auc"])
        after = model.evaluate(valid, users, items, opts.encode_batch_size, progress)
        kept = "encoder"
        best = stage_b.pop("best")
        if best is not None and best[0] > after["auc"]:  # an earlier step was better on validation: keep it
            log.info("keeping stage B's step %d (validation AUC %.4f; %.4f at the end)", best[1], best[0], after["auc"])
            restore_stage_b_state(model, best[2])
            after = model.evaluate(valid, users, items, opts.encode_batch_size, progress)
            kept = f"step {best[1]}"
        if after["auc"] < head["auc"]:
            # model selection on validation, as for the head's epochs: fine-tuning that made the language
            # model worse is dropped; the saved encoder is then the base model, with the warm-started head
            log.warning("stage B lowered the validation AUC (%.4f -> %.4f): keeping the base encoder and the "
                        "stage A head", head["auc"], after["auc"])
            model.encoder = PooledEncoder(base, opts.max_length, None, pooling=Pooling.MEAN, normalize=False,
                                          trust_remote_code=opts.trust_remote_code)
            model.head.load_state_dict(head_state)
            after, kept = head, "head"
    else:  # the encoder is the frozen base model: the cached vectors are its vectors, the head is final
        stage_b = {"losses": [], "seen": 0, "stopped": False, "epochs_started": 0, "seconds": 0.0, "evaluations": []}
        after = head
    log.info("validation AUC of the language model: %.4f before, %.4f after stage A (head), %.4f after adaptation",
             before["auc"], head["auc"], after["auc"])

    config = HeadConfig(input_dim=model.head.transform[0].in_features, hidden_dim=opts.hidden_dim,
                        rep_dim=opts.rep_dim, max_length=opts.max_length, template_options=asdict(templates))
    seen, train_s = stage_b["seen"], stage_b["seconds"]
    report = {
        "dataset": data.schema.name, "dataset_fingerprint": data.schema.fingerprint,
        "base_model": str(base), "base_model_name": model_name(base), "base_weights_hash": weights_hash(base),
        "options": {k: str(v) for k, v in asdict(opts).items()}, "tune": opts.tune, "encoder_lr": opts.encoder_lr,
        "template_options": asdict(templates), "train_rows": len(train), "valid_rows": len(valid),
        # rows_used: sampled training rows learnt from (stage A passes over all of them); steps: stage B steps
        "rows_used": len(train) if opts.head_epochs else min(seen, len(train)),
        "rows_trained": seen, "steps": len(stage_b["losses"]), "epochs_started": stage_b["epochs_started"],
        "train_seconds": train_s, "rows_per_second": seen / train_s if train_s > 0 else 0.0,
        "stopped_by_time_budget": stage_b["stopped"],
        "valid_auc_before": before["auc"], "valid_auc_head": head["auc"], "valid_auc_after": after["auc"],
        "valid_logloss_before": before["logloss"], "valid_logloss_head": head["logloss"],
        "valid_logloss_after": after["logloss"], "train_loss": stage_b["losses"], **stage_a["stats"],
        "stored_vector": STORED_VECTOR, "table_head": ELEC_TRANSFORM, "stage_b_evaluations": stage_b["evaluations"],
        "stage_b_head_lr": opts.head_lr if opts.stage_b_head_lr is None else opts.stage_b_head_lr,
        # encoder: the fine-tuned encoder at the end; "step N": at stage B's step N; head: the base encoder
        # (stage B did not help, or none)
        "kept": kept,
    }
    report["seconds"] = time.perf_counter() - run_start  # the whole run: loading, both stages, evaluation
    _save_atomically(model, config, report, opts.out)
    log.info("adapted model saved to %s", opts.out)
    return report


def _save_atomically(model: ElecModel, config: HeadConfig, report: dict, out: Path) -> None:
    """A crash leaves the previous folder or the new one, never a half-written model."""
    with atomic_dir(out) as tmp:
        model.save(tmp, config)
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m embedding_jobs.ctr_adapt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = AdaptOptions(Path(), Path(), Path())
    p.add_argument("--dataset", type=Path, required=True, help="a prepared dataset folder (python -m recsys.prepare)")
    p.add_argument("--out", type=Path, required=True, help="folder for the adapted model (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--model", type=Path, default=None,
                   help="local Hugging Face model folder, encoder or decoder (default: the packaged MiniLM)")
    p.add_argument("--rows", type=int, default=d.rows, help="training rows sampled (seeded; default %(default)s)")
    p.add_argument("--valid-rows", type=int, default=d.valid_rows, help="validation rows sampled for the AUC (default %(default)s)")
    p.add_argument("--tune", choices=TUNES, default=d.tune,
                   help="stage B trains LoRA adapters (lora), every encoder weight (full), or nothing (head: only "
                        "stage A's head on the frozen encoder; the saved encoder is the base model) (default "
                        "%(default)s)")
    p.add_argument("--full", dest="tune", action="store_const", const="full", help="alias of --tune full")
    p.add_argument("--head-epochs", type=int, default=d.head_epochs,
                   help="stage A: passes of the head over the sampled rows on the frozen encoder's cached vectors, "
                        "0 for no warm start (default %(default)s)")
    p.add_argument("--head-batch-size", type=int, default=d.head_batch_size,
                   help="stage A: rows per step (default %(default)s)")
    p.add_argument("--encode-batch-size", type=int, default=d.encode_batch_size,
                   help="texts per forward pass when encoding without gradient (stage A and the final validation; "
                        "default %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs,
                   help="stage B: passes over the sampled rows, at most (default %(default)s)")
    p.add_argument("--time-budget-s", type=float, default=d.time_budget_s,
                   help="stop stage B (encoder fine-tuning) after this many seconds, 0 for no limit (default "
                        "%(default)s); it applies to stage B only: stage A (encoding the texts once, training the "
                        "head), evaluation and saving come on top")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="stage B: rows per step (default %(default)s)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"stage B: encoder learning rate (default: {LORA_LR:g} with LoRA, {FULL_LR:g} with --tune full)")
    p.add_argument("--head-lr", type=float, default=d.head_lr,
                   help="learning rate of the transformation MLP and the prediction layer, in stages A and B "
                        "(default %(default)s)")
    p.add_argument("--stage-b-head-lr", type=float, default=None,
                   help="stage B: learning rate of the head (default: --head-lr; 0 freezes the head)")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="stage B: measure the validation AUC every N steps and keep the best step (default 0: "
                        "only at the end)")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help="default %(default)s")
    p.add_argument("--hidden-dim", type=int, default=d.hidden_dim, help="hidden width of the transformation MLP (default %(default)s)")
    p.add_argument("--rep-dim", type=int, default=d.rep_dim, help="size of the stored representation vector (default %(default)s)")
    p.add_argument("--max-length", type=int, default=d.max_length,
                   help="tokens per text (default %(default)s); the embedding job uses the same (a cut user text "
                        "keeps its newest history)")
    p.add_argument("--history-length", type=int, default=TemplateOptions.history_length,
                   help="interactions in a user's text (default %(default)s; 0: the profile only)")
    p.add_argument("--history-item-field", default=None,
                   help="field that names an item in user texts (default: title if present, else item_id)")
    p.add_argument("--history-outcomes", action=argparse.BooleanOptionalAction, default=False,
                   help="name each history item's rating in the user texts (default: off, because user texts are "
                        "built from training rows and would leak their labels into training)")
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the model")
    p.add_argument("--seed", type=int, default=d.seed, help="sampling, initialisation and order (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="tracebacks and transformers' own logs")
    a = p.parse_args(argv)
    setup_job_cli(a.verbose, a.threads)
    try:
        opts = AdaptOptions(
            dataset=a.dataset, out=a.out, model=a.model or packaged_minilm(), rows=a.rows, valid_rows=a.valid_rows,
            epochs=a.epochs, time_budget_s=a.time_budget_s or None, batch_size=a.batch_size, lr=a.lr,
            head_lr=a.head_lr, stage_b_head_lr=a.stage_b_head_lr, eval_every=a.eval_every, tune=a.tune, head_epochs=a.head_epochs, head_batch_size=a.head_batch_size,
            encode_batch_size=a.encode_batch_size, lora_rank=a.lora_rank, hidden_dim=a.hidden_dim, rep_dim=a.rep_dim,
            max_length=a.max_length, templates=TemplateOptions(history_length=a.history_length,
                                                               history_item_field=a.history_item_field,
                                                               history_outcomes=a.history_outcomes),
            trust_remote_code=a.trust_remote_code, seed=a.seed, overwrite=a.overwrite)
        report = adapt(opts, progress=not a.no_progress)
    except (ModelError, DataError, FileNotFoundError, FileExistsError, ValueError) as e:
        log.error("%s", e, exc_info=a.verbose)
        return 2
    stage_b = (f"; stage B ({opts.tune}): {report['rows_trained']} rows in {report['steps']} steps, "
               f"{report['train_seconds']:.0f} s ({report['rows_per_second']:.1f} rows/s)" if opts.trains_encoder
               else "; no stage B (--tune head)")
    print(f"ELEC adaptation: validation AUC {report['valid_auc_before']:.4f} (untrained head) -> "
          f"{report['valid_auc_head']:.4f} (stage A) -> {report['valid_auc_after']:.4f} (final) "
          f"({report['valid_rows']} rows); stage A: {report['head_texts_encoded']} texts encoded in "
          f"{report['head_encode_seconds']:.0f} s, head {report['head_epochs']} epochs over {report['train_rows']} "
          f"rows in {report['head_train_seconds']:.1f} s{stage_b}; {report['seconds']:.0f} s in all; model saved "
          f"to {opts.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
