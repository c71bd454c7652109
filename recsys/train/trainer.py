"""The one training loop, for every backbone and every method.

    task = build_task(schema, cfg)          # an nn.Module: batch -> (loss, (loss, logits, labels, weights))
    fuse the embedding optimizer            # FBGEMM fused kernels, applied in backward
    plan, shard                             # EmbeddingShardingPlanner + DistributedModelParallel
    for each epoch: train (TrainPipelineSparseDist), evaluate (global AUC/logloss), checkpoint, early-stop
    restore the best checkpoint, evaluate on test

A run folder holds config.yaml, plan.txt, metrics.csv, metrics.json, test_metrics.json, curves.png and
checkpoints/{last,best}. Rerunning the same experiment resumes from checkpoints/last.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import yaml
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from tqdm.auto import tqdm

from recsys.data.batch import Batch
from recsys.data.loader import ParquetBatches
from recsys.data.schema import PreparedSchema
from recsys.methods.registry import build_task, check_method
from recsys.models import BACKBONES
from recsys.train.checkpoint import Checkpointer, load_part
from recsys.train.config import ConfigError, ExperimentConfig
from recsys.train.distributed import (
    DENSE_OPTIMIZERS,
    DistEnv,
    check_optim,
    check_sharding_types,
    dense_parameters,
    describe_plan,
    fuse_embedding_optimizer,
    init_distributed,
    plan_and_shard,
)
from recsys.train.metrics import evaluate_predictions
from recsys.train.plots import plot_curves

log = logging.getLogger(__name__)

TaskBuilder = Callable[[PreparedSchema, ExperimentConfig], nn.Module]


def check_config(cfg: ExperimentConfig, env: DistEnv, schema: PreparedSchema | None = None) -> None:
    """Everything that can be wrong with a configuration, found before any training starts."""
    if cfg.model.backbone not in BACKBONES:
        raise ConfigError(f"model.backbone {cfg.model.backbone!r} is unknown; choose from {sorted(BACKBONES)}")
    if cfg.model.embedding_dim <= 0 or cfg.model.embedding_dim % 4:
        raise ConfigError(f"model.embedding_dim={cfg.model.embedding_dim}: FBGEMM needs a positive multiple of 4")
    for name in ("batch_size", "eval_batch_size"):
        size = getattr(cfg.data, name)
        if size <= 0 or size % env.world_size:
            raise ConfigError(f"data.{name}={size} is the global batch and must split evenly over "
                              f"{env.world_size} ranks; use a multiple of {env.world_size}")
    if cfg.train.epochs < 1 or cfg.train.patience < 1:
        raise ConfigError("train.epochs and train.patience must be >= 1")
    check_optim(cfg.optim, env.device)
    check_sharding_types(cfg.train.sharding_types, env.device)
    check_method(cfg, schema)


@dataclass
class RunState:
    epoch: int = -1  # last finished epoch
    best_epoch: int = -1
    best_auc: float = -math.inf
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)
    step_losses: list[list[float]] = field(default_factory=list)


class Trainer:
    def __init__(self, cfg: ExperimentConfig, build_task: TaskBuilder = build_task) -> None:
        self.cfg = cfg
        self.env = init_distributed()
        cores = os.cpu_count() or 1
        torch.set_num_threads(cfg.train.num_threads or max(1, cores // self.env.local_world_size))
        self.schema = PreparedSchema.load(cfg.data.path)
        check_config(cfg, self.env, self.schema)
        self.run_dir = cfg.run_dir
        self.ckpt = Checkpointer(self.run_dir / "checkpoints", self.env.is_main)
        if not cfg.train.resume and self.ckpt.exists("last"):
            raise ConfigError(f"{self.run_dir} already holds a run; pass train.resume=true to continue it, "
                              "or choose another name")
        self.per_rank_batch = cfg.data.batch_size // self.env.world_size
        self._seed(cfg.train.seed)
        task = build_task(self.schema, cfg)
        fuse_embedding_optimizer(task, cfg.optim)
        self.model, plan = plan_and_shard(task, self.env, self.per_rank_batch, cfg.train.sharding_types)
        self.plan_text = describe_plan(plan)
        if not self.ckpt.exists("last"):  # a resumed run has these weights in its own checkpoint
            for prefix, path in getattr(task, "warm_start", {}).items():
                n = load_part(path, self.model, target_prefix=prefix)
                self._log(f"loaded {n} tensors of {prefix.rstrip('.')} from {path}")
        dense_cls = DENSE_OPTIMIZERS[cfg.optim.dense_optimizer]
        self.dense_optimizer = KeyedOptimizerWrapper(
            dense_parameters(self.model),
            lambda params: dense_cls(params, lr=cfg.optim.dense_lr, weight_decay=cfg.optim.dense_weight_decay))
        self.optimizer = CombinedOptimizer([self.model.fused_optimizer, self.dense_optimizer])
        self.pipeline = (TrainPipelineSparseDist(self.model, self.optimizer, self.env.device)
                         if cfg.train.pipeline else None)
        d = cfg.data
        self.train_batches = ParquetBatches(d.path, "train", self.schema, self.per_rank_batch, self.env.rank,
                                            self.env.world_size, shuffle=True, seed=cfg.train.seed,
                                            window_row_groups=d.window_row_groups)
        self.eval_per_rank = d.eval_batch_size // self.env.world_size

    # ------------------------------------------------------------------------------------------
    def _seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _log(self, msg: str) -> None:
        if self.env.is_main:
            log.info(msg)

    def _steps(self, batches: Iterator[Batch]) -> Iterator[tuple]:
        """One forward (and, in train mode, backward and optimizer step) per batch."""
        if self.pipeline is not None:
            while True:
                try:
                    yield self.pipeline.progress(batches)
                except StopIteration:
                    return
        for batch in batches:
            batch = batch.to(self.env.device)
            if self.model.training:
                self.optimizer.zero_grad()
                loss, out = self.model(batch)
                loss.backward()
                self.optimizer.step()
            else:
                _, out = self.model(batch)
            yield out

    def train_epoch(self, epoch: int, state: RunState) -> tuple[float, float]:
        self.model.train()
        self._seed(self.cfg.train.seed * 1000 + epoch * 10 + self.env.rank)  # dropout masks, per epoch
        self.train_batches.set_epoch(epoch)
        total = len(self.train_batches)
        limit = self.cfg.train.max_steps_per_epoch
        if limit:
            total = min(total, limit)
        it = iter(self.train_batches)
        if limit:
            it = (b for _, b in zip(range(limit), it, strict=False))
        bar = tqdm(total=total, desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}", unit="step",
                   disable=not (self.env.is_main and self.cfg.train.progress), dynamic_ncols=True)
        loss_sum = rows = 0.0
        start = time.perf_counter()
        for step, (loss, _logits, _labels, weights) in enumerate(self._steps(it)):
            n = float(weights.sum())
            loss_sum += float(loss) * n
            rows += n
            if step % 10 == 0:
                state.step_losses.append([epoch * total + step, float(loss)])
            elapsed = time.perf_counter() - start
            bar.update()
            bar.set_postfix(loss=f"{float(loss):.4f}",
                            samples_s=f"{rows * self.env.world_size / max(elapsed, 1e-9):,.0f}")
        bar.close()
        elapsed = time.perf_counter() - start
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"epoch {epoch + 1}: the training loss is not finite; lower the learning rates")
        return loss_sum / max(rows, 1.0), rows * self.env.world_size / elapsed

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        self.model.eval()
        batches = ParquetBatches(self.cfg.data.path, split, self.schema, self.eval_per_rank, self.env.rank,
                                 self.env.world_size)
        logits, labels, weights = [], [], []
        for _, lg, lb, w in self._steps(iter(batches)):
            logits.append(lg)
            labels.append(lb)
            weights.append(w)
        return evaluate_predictions(torch.cat(logits).float().cpu(), torch.cat(labels).cpu(),
                                    torch.cat(weights).cpu())

    def _save(self, name: str, state: RunState) -> None:
        self.ckpt.save(name, self.model, self.optimizer, vars(state))

    def _restore(self, name: str, with_optimizer: bool = True) -> RunState:
        if with_optimizer:
            self.dense_optimizer.init_state()  # Adam's state is created lazily; DCP loads in place
        meta = self.ckpt.load(name, self.model, self.optimizer if with_optimizer else None)
        return RunState(**meta)

    # ------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, env = self.cfg, self.env
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            (self.run_dir / "plan.txt").write_text(self.plan_text + "\n")
            print(f"sharding plan ({env.world_size} rank(s), {env.device.type}):\n{self.plan_text}", flush=True)
        state = RunState()
        if cfg.train.resume and self.ckpt.exists("last"):
            state = self._restore("last")
            self._log(f"resumed from {self.ckpt.path('last')} after epoch {state.epoch + 1}")
        samples_per_s = []
        while state.epoch + 1 < cfg.train.epochs and not state.stopped_early:
            epoch = state.epoch + 1
            train_loss, sps = self.train_epoch(epoch, state)
            samples_per_s.append(sps)
            valid = self.evaluate("valid")
            state.epoch = epoch
            state.history.append({"epoch": epoch, "train_loss": train_loss, "valid_auc": valid["auc"],
                                  "valid_logloss": valid["logloss"], "train_samples_per_s": sps})
            improved = valid["auc"] > state.best_auc
            if improved:
                state.best_auc, state.best_epoch, state.bad_epochs = valid["auc"], epoch, 0
            else:
                state.bad_epochs += 1
                state.stopped_early = state.bad_epochs >= cfg.train.patience
            self._log(f"epoch {epoch + 1}: train loss {train_loss:.4f}, valid AUC {valid['auc']:.4f}, "
                      f"logloss {valid['logloss']:.4f}, {sps:,.0f} samples/s"
                      + (" (best)" if improved else f" (no gain for {state.bad_epochs})"))
            if improved:
                self._save("best", state)
            self._save("last", state)
            self._write_progress(state)
        if state.stopped_early:
            self._log(f"early stop: no better validation AUC for {cfg.train.patience} epoch(s)")
        best_state = self._restore("best", with_optimizer=False)
        valid, test = self.evaluate("valid"), self.evaluate("test")
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result = {
            "name": cfg.name, "backbone": cfg.model.backbone, "dataset": self.schema.name,
            "fingerprint": self.schema.fingerprint, "seed": cfg.train.seed, "world_size": env.world_size,
            "best_epoch": best_state.best_epoch + 1, "epochs_run": state.epoch + 1,
            "valid_auc": valid["auc"], "valid_logloss": valid["logloss"],
            "test_auc": test["auc"], "test_logloss": test["logloss"], "test_rows": test["rows"],
            "train_samples_per_s": float(np.mean(samples_per_s)) if samples_per_s else None,
            "peak_rss_mb_rank0": peak_mb,
        }
        if env.is_main:
            (self.run_dir / "test_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
            self._write_progress(state)
        return result

    def _write_progress(self, state: RunState) -> None:
        if not self.env.is_main:
            return
        with open(self.run_dir / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(state.history[0]))
            w.writeheader()
            w.writerows(state.history)
        (self.run_dir / "metrics.json").write_text(json.dumps(vars(state), indent=1) + "\n")
        plot_curves(state.history, [tuple(x) for x in state.step_losses], self.run_dir / "curves.png",
                    f"{self.cfg.name} ({self.cfg.model.backbone}, {self.schema.name})")


def results_table(result: dict) -> str:
    rows = [("valid", result["valid_auc"], result["valid_logloss"]),
            ("test", result["test_auc"], result["test_logloss"])]
    out = [f"{result['backbone']} on {result['dataset']} (best epoch {result['best_epoch']}, seed {result['seed']})",
           f"{'split':<6} {'AUC':>8} {'logloss':>9}"]
    out += [f"{s:<6} {a:>8.4f} {ll:>9.4f}" for s, a, ll in rows]
    return "\n".join(out)

