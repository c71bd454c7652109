"""The one training loop, for every backbone, every method and every stage.

    trainer = Trainer(cfg, task, env, schema)   # the entry point builds the task and the process group
    fuse the embedding optimizer                # FBGEMM fused kernels, applied in backward
    plan, shard                                 # EmbeddingShardingPlanner + DistributedModelParallel
    for each stage of the task (e.g. pre-train, then fine-tune):
        start from the previous stage's best weights (or resume this stage's last checkpoint)
        for each epoch: train (TrainPipelineSparseDist), evaluate the stage's metrics, checkpoint, early-stop
    restore the final stage's best checkpoint, evaluate it on valid and test

The trainer knows the task protocol (``recsys.train.task``) and no method. A run folder holds config.yaml,
plan.txt, metrics.csv, metrics.json, test_metrics.json, curves.png and checkpoints/{last,best} of the final
stage; an earlier stage keeps its own under stages/<name>/. Rerunning the same experiment resumes from the
last complete checkpoint of the stage it was in.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import yaml
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from tqdm.auto import tqdm

from recsys.atomic import write_text_atomic
from recsys.data.batch import Batch
from recsys.data.loader import ParquetBatches, embedding_lookup
from recsys.data.schema import PreparedSchema
from recsys.train.checkpoint import Checkpointer, load_warm_start
from recsys.train.config import ConfigError, DataConfig, GroupOptimConfig, OptimConfig, TrainConfig
from recsys.train.distributed import (
    DENSE_OPTIMIZERS,
    DistEnv,
    check_optim,
    check_sharding_types,
    dense_parameters,
    describe_plan,
    embedding_bytes,
    fuse_embedding_optimizer,
    plan_and_shard,
    set_fused_learning_rate,
    zero_fused_optimizer_state,
)
from recsys.train.plots import plot_curves
from recsys.train.task import ParamGroup, Stage, Task

log = logging.getLogger(__name__)


class RunConfig(Protocol):
    """What the trainer reads of an experiment (``recsys.experiment.ExperimentConfig`` is one)."""

    name: str
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig

    @property
    def run_dir(self) -> Path: ...

    def to_dict(self) -> dict[str, Any]: ...

    def describe(self) -> dict[str, str]: ...  # what records name the run by (backbone, method)


def check_run_config(cfg: RunConfig, env: DistEnv) -> None:
    """Everything in the trainer's own sections that can be wrong, found before any training starts."""
    for name in ("batch_size", "eval_batch_size"):
        size = getattr(cfg.data, name)
        if size <= 0 or size % env.world_size:
            raise ConfigError(f"data.{name}={size} is the global batch and must split evenly over "
                              f"{env.world_size} ranks; use a multiple of {env.world_size}")
    t = cfg.train
    if t.epochs < 1 or t.patience < 1 or any(
            n < 1 for n in (*t.stage_epochs.values(), *t.stage_steps.values(), *t.stage_eval_steps.values())):
        raise ConfigError("train.epochs, train.patience and the train.stage_* values must be >= 1")
    for stage, size in t.stage_batch_size.items():
        if size <= 0 or size % env.world_size:
            raise ConfigError(f"train.stage_batch_size.{stage}={size} must be a positive multiple of "
                              f"{env.world_size} (the ranks)")
    if "train" in cfg.data.unlabeled_splits or len(set(cfg.data.unlabeled_splits)) != len(cfg.data.unlabeled_splits):
        raise ConfigError(f"data.unlabeled_splits={cfg.data.unlabeled_splits}: name other splits than train, each once")
    if cfg.data.min_count < 1:
        raise ConfigError(f"data.min_count={cfg.data.min_count}: must be >= 1 (1: only ids never seen in training "
                          "read the unknown id's row)")
    check_optim(cfg.optim, env.device)
    check_sharding_types(cfg.train.sharding_types, env.device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class RunState:
    epoch: int = -1  # last finished epoch of the stage
    best_epoch: int = -1
    best_value: float = -math.inf  # the stage's monitored validation metric at best_epoch
    bad_epochs: int = 0
    stopped_early: bool = False
    step: int = 0  # optimizer steps taken in the stage (learning-rate schedules follow it)
    history: list[dict] = field(default_factory=list)
    step_losses: list[list[float]] = field(default_factory=list)

    @classmethod
    def from_meta(cls, meta: dict) -> RunState:
        meta = dict(meta)
        if "best_auc" in meta:  # checkpoints written before stages existed
            meta["best_value"] = meta.pop("best_auc")
        return cls(**meta)


def _lr_factor(schedule: str, warmup: int, step: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class _Group:
    """A dense parameter group as built: its optimizer and, where it has one, its learning-rate schedule."""

    name: str
    optimizer: KeyedOptimizerWrapper
    lr: float
    schedule: str
    warmup: int

    @property
    def scheduled(self) -> bool:
        return self.schedule != "constant" or self.warmup > 0

    def set_step(self, step: int, total: int) -> None:
        lr = self.lr * _lr_factor(self.schedule, self.warmup, step, total)
        for g in self.optimizer.param_groups:
            g["lr"] = lr


class Trainer:
    def __init__(self, cfg: RunConfig, task: Task, env: DistEnv, schema: PreparedSchema) -> None:
        self.cfg, self.task, self.env, self.schema = cfg, task, env, schema
        check_run_config(cfg, env)
        if cfg.data.unlabeled_splits and not task.learns_from_unlabeled:
            raise ConfigError(f"data.unlabeled_splits={cfg.data.unlabeled_splits}: {type(task).__name__} learns "
                              "nothing from rows without labels (ELEC's two-stage student does, through its "
                              "teacher's scores); leave it empty")
        names = [s.name for s in task.stages]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"{type(task).__name__} must declare uniquely named stages, got {names}")
        for key in ("stage_epochs", "stage_steps", "stage_eval_steps", "stage_batch_size", "stage_embedding_lr",
                    "stage_group_lr", "fresh_embedding_optimizer"):
            unknown = sorted(set(getattr(cfg.train, key)) - set(names))
            if unknown:
                raise ConfigError(f"train.{key} names unknown stage(s) {unknown}; this task's stages: {names}")
        if names[-1] in cfg.train.stage_eval_steps:
            raise ConfigError(f"train.stage_eval_steps: the final stage ({names[-1]}) is tested and selected on whole "
                              "splits; only earlier stages can validate on part of one")
        self.run_dir = cfg.run_dir
        self.checkpointers = {s.name: Checkpointer(self.stage_dir(s) / "checkpoints", env.is_main)
                              for s in task.stages}
        started = any(c.exists("last") for c in self.checkpointers.values())
        if not cfg.train.resume and started:
            raise ConfigError(f"{self.run_dir} already holds a run; pass train.resume=true to continue it, "
                              "or choose another name")
        self.per_rank_batch = cfg.data.batch_size // env.world_size
        fuse_embedding_optimizer(task, cfg.optim)
        # a stage may leave parameters of another stage unused: DDP must then look for them every step
        self.model, plan = plan_and_shard(task, env, self.per_rank_batch, cfg.train.sharding_types,
                                          find_unused_parameters=len(task.stages) > 1)
        self.plan_text = describe_plan(plan)
        self.embedding_mb_per_rank = self._embedding_mb_per_rank()
        if not started:  # a resumed run has these weights in its own checkpoint
            for prefix, path, n in load_warm_start(task.warm_start(), self.model):
                self._log(f"loaded {n} tensors of {prefix.rstrip('.')} from {path}")
        self.lookup = embedding_lookup(cfg.data.path, schema, cfg.data.min_count, cfg.data.unlabeled_splits)
        self.stage = task.stages[0]
        self.train_batches = self._train_batches(self.stage)
        if cfg.data.unlabeled_splits:
            rows = self.train_batches.rows_by_split
            self._log(f"training rows: {rows.pop('train'):,} labeled (train) and "
                      + ", ".join(f"{n:,} unlabeled ({s})" for s, n in rows.items())
                      + ", whose labels no loss reads; their ids count towards data.min_count")
        task.set_stage(self.stage)
        self._build_optimizer()
        self.pipeline = (TrainPipelineSparseDist(self.model, self.optimizer, env.device)
                         if cfg.train.pipeline else None)

    # ------------------------------------------------------------------------------------------
    def stage_dir(self, stage: Stage) -> Path:
        """The final stage's files are the run's own (exports and teachers read checkpoints/best there)."""
        return self.run_dir if stage is self.task.stages[-1] else self.run_dir / "stages" / stage.name

    def _train_batches(self, stage: Stage) -> ParquetBatches:
        d = self.cfg.data
        per_rank = self.cfg.train.stage_batch_size.get(stage.name, d.batch_size) // self.env.world_size
        return ParquetBatches(d.path, "train", self.schema, per_rank, self.env.rank, self.env.world_size,
                              shuffle=True, seed=self.cfg.train.seed, window_row_groups=d.window_row_groups,
                              extra_columns=self.task.extra_columns, side_files=self.task.side_files("train"),
                              lookup=self.lookup, unlabeled=d.unlabeled_splits)

    def _embedding_mb_per_rank(self) -> list[float]:
        """Every rank's share of the embedding tables (weights and optimizer state), in MB."""
        mine = embedding_bytes(self.model) / 2**20
        every: list[float] = [0.0] * self.env.world_size
        torch.distributed.all_gather_object(every, mine)
        self._log("embedding tables per rank (weights and optimizer state): "
                  + ", ".join(f"rank {r} {mb:,.1f} MB" for r, mb in enumerate(every)))
        return every

    def stage_epochs(self, stage: Stage) -> int:
        return self.cfg.train.stage_epochs.get(stage.name, self.cfg.train.epochs)

    def _log(self, msg: str) -> None:
        if self.env.is_main:
            log.info(msg)

    def _build_optimizer(self) -> None:
        """The fused embedding optimizer plus one dense optimizer per parameter group of the task."""
        o = self.cfg.optim
        dense = dense_parameters(self.model)
        names = {id(p): n for n, p in self.task.named_parameters()}
        declared = self.task.param_groups()
        in_stage = self.cfg.train.stage_group_lr.get(self.stage.name, {})
        for key, given in (("optim.groups", o.groups), (f"train.stage_group_lr.{self.stage.name}", in_stage)):
            unknown = sorted(set(given) - {g.name for g in declared} - {"dense"})
            if unknown:
                raise ConfigError(f"{key} names unknown parameter group(s) {unknown}; this task's groups: "
                                  f"{['dense', *[g.name for g in declared]]}")
        members: dict[str, dict[str, torch.nn.Parameter]] = {g.name: {} for g in [ParamGroup("dense", ()), *declared]}
        for key, p in dense.items():
            task_name = names.get(id(p), key)
            group = next((g.name for g in declared if task_name.startswith(g.prefixes)), "dense")
            members[group][key] = p
        self.groups: list[_Group] = []
        for g in [ParamGroup("dense", ()), *declared]:
            if not members[g.name]:
                continue
            user = o.groups.get(g.name, GroupOptimConfig())
            kind = user.optimizer or g.optimizer or o.dense_optimizer
            lr = _first(in_stage.get(g.name), user.lr, g.lr, o.dense_lr)
            if g.name in in_stage:
                self._log(f"stage {self.stage.name}: group {g.name} at learning rate {lr:g} (train.stage_group_lr)")
            wd = _first(user.weight_decay, g.weight_decay, o.dense_weight_decay)
            schedule = user.schedule or g.schedule or "constant"
            warmup = _first(user.warmup_steps, g.warmup_steps, 0)
            if kind not in DENSE_OPTIMIZERS:
                raise ConfigError(f"optim.groups.{g.name}.optimizer {kind!r} is not one of {sorted(DENSE_OPTIMIZERS)}")
            opt = KeyedOptimizerWrapper(members[g.name],
                                        lambda ps, c=DENSE_OPTIMIZERS[kind], lr=lr, wd=wd: c(ps, lr=lr, weight_decay=wd))
            self.groups.append(_Group(g.name, opt, lr, schedule, warmup))
        # the default group keeps the name it always had in checkpoints
        parts = [self.model.fused_optimizer] + [g.optimizer if g.name == "dense" else (g.name, g.optimizer)
                                                for g in self.groups]
        self.optimizer = CombinedOptimizer(parts)

    def _steps(self, batches: Iterator[Batch]) -> Iterator[dict[str, torch.Tensor]]:
        """One forward (and, in train mode, backward and optimizer step) per batch; yields the step outputs."""
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

    def _step_limit(self) -> int | None:
        """At most this many steps per epoch of the current stage (train.stage_steps, else max_steps_per_epoch)."""
        return self.cfg.train.stage_steps.get(self.stage.name, self.cfg.train.max_steps_per_epoch)

    def _steps_per_epoch(self) -> int:
        limit = self._step_limit()
        return min(len(self.train_batches), limit) if limit else len(self.train_batches)

    def train_epoch(self, epoch: int, state: RunState) -> tuple[float, float]:
        self.model.train()
        seed_everything(self.cfg.train.seed * 1000 + epoch * 10 + self.env.rank)  # dropout masks, per epoch
        self.train_batches.set_epoch(epoch)
        total = self._steps_per_epoch()
        limit = self._step_limit()
        it = iter(self.train_batches)
        if limit:
            it = (b for _, b in zip(range(limit), it, strict=False))
        scheduled = [g for g in self.groups if g.scheduled]
        stage_steps = total * self.stage_epochs(self.stage)
        prefix = "" if len(self.task.stages) == 1 else f"{self.stage.name} "
        bar = tqdm(total=total, desc=f"{prefix}epoch {epoch + 1}/{self.stage_epochs(self.stage)}", unit="step",
                   disable=not (self.env.is_main and self.cfg.train.progress), dynamic_ncols=True)
        loss_sum = rows = 0.0
        start = time.perf_counter()
        for g in scheduled:
            g.set_step(state.step, stage_steps)
        for step, out in enumerate(self._steps(it)):
            state.step += 1
            for g in scheduled:  # the rate of the next step (the pipeline runs one batch ahead in input only)
                g.set_step(state.step, stage_steps)
            loss = float(out["loss"])
            n = float(out["weights"].sum())
            loss_sum += loss * n
            rows += n
            if step % 10 == 0:
                state.step_losses.append([epoch * total + step, loss])
            elapsed = time.perf_counter() - start
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rows * self.env.world_size / max(elapsed, 1e-9):,.0f}")
        bar.close()
        elapsed = time.perf_counter() - start
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"{prefix}epoch {epoch + 1}: the training loss is not finite; lower the "
                                     "learning rates")
        return loss_sum / max(rows, 1.0), rows * self.env.world_size / elapsed

    @torch.no_grad()
    def evaluate(self, split: str, stage: Stage | None = None) -> dict[str, Any]:
        """The metrics of ``stage`` (default: the current one) on ``split``, over every rank's rows."""
        self.model.eval()
        stage = stage or self.stage
        # a stage with its own (small) training batch validates in batches of that size too
        per_rank = self.cfg.train.stage_batch_size.get(stage.name, self.cfg.data.eval_batch_size) // self.env.world_size
        batches = ParquetBatches(self.cfg.data.path, split, self.schema, per_rank, self.env.rank,
                                 self.env.world_size, extra_columns=self.task.extra_columns,
                                 side_files=self.task.side_files(split), lookup=self.lookup)
        evaluator = self.task.evaluator(stage, batches.path)
        it = iter(batches)
        limit = self.cfg.train.stage_eval_steps.get(stage.name)
        if limit:  # every rank takes the same number of batches
            it = (b for _, b in zip(range(limit), it, strict=False))
        for out in self._steps(it):
            evaluator.update(out)
        return evaluator.compute()

    def _save(self, name: str, state: RunState) -> None:
        self.checkpointers[self.stage.name].save(name, self.model, self.optimizer, vars(state))

    def _restore(self, name: str, with_optimizer: bool = True, stage: Stage | None = None) -> RunState:
        if with_optimizer:
            for g in self.groups:
                g.optimizer.init_state()  # Adam's state is created lazily; DCP loads in place
        ckpt = self.checkpointers[(stage or self.stage).name]
        meta = ckpt.load(name, self.model, self.optimizer if with_optimizer else None)
        return RunState.from_meta(meta)

    def _carry_embedding_optimizer(self, finished: Stage) -> None:
        """The fused embedding optimizer's state as ``finished`` left it, for a run resumed after that stage.

        The embedding optimizer lives in the sharded model, so in one process it carries from stage to stage
        (Adagrad's sums included) while each stage's dense optimizers start fresh; a process that resumes after
        ``finished`` ended restores that state from the stage's last checkpoint, else it would fine-tune from
        zeroed sums and end elsewhere than the uninterrupted run.
        """
        self._enter(finished)
        self._restore("last", stage=finished)
        self._log(f"embedding optimizer state restored from stage {finished.name}'s last checkpoint")

    def _enter(self, stage: Stage) -> None:
        """Make ``stage`` the current one: the task's forward, fresh dense optimizers and pipeline for it (the
        fused embedding optimizer is the model's and carries on)."""
        if stage is self.stage:
            return
        if self.pipeline is not None:
            self.pipeline.detach()  # give the modules their own forwards back before the next stage traces them
            self.pipeline = None
        self.stage = stage
        self.task.set_stage(stage)
        self.train_batches = self._train_batches(stage)
        self._build_optimizer()
        if self.cfg.train.pipeline:
            self.pipeline = TrainPipelineSparseDist(self.model, self.optimizer, self.env.device)

    # ------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, env = self.cfg, self.env
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            (self.run_dir / "plan.txt").write_text(self.plan_text + "\n")
            print(f"sharding plan ({env.world_size} rank(s), {env.device.type}):\n{self.plan_text}", flush=True)
        stages = self.task.stages
        samples_per_s: list[float] = []
        ran_previous = False  # whether the previous stage trained in this process
        for i, stage in enumerate(stages):
            final = i == len(stages) - 1
            if not final and (self.stage_dir(stage) / "stage.json").is_file():
                self._log(f"stage {stage.name}: finished in an earlier run")
                continue
            if i and not ran_previous and not self.checkpointers[stage.name].exists("last"):
                self._carry_embedding_optimizer(stages[i - 1])
            self._enter(stage)
            ran_previous = True
            samples_per_s = self._fit_stage(stage, previous=stages[i - 1] if i else None)
            if not final and env.is_main:
                write_text_atomic(self.stage_dir(stage) / "stage.json",
                                  json.dumps({"stage": stage.name, "finished": True}) + "\n")
        final_stage = stages[-1]
        best_state = self._restore("best", with_optimizer=False, stage=final_stage)
        valid, test = self.evaluate("valid", final_stage), self.evaluate("test", final_stage)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        state = RunState.from_meta(self.checkpointers[final_stage.name].meta("last"))
        result = {
            "name": cfg.name, **cfg.describe(), "dataset": self.schema.name,
            "fingerprint": self.schema.fingerprint, "seed": cfg.train.seed, "world_size": env.world_size,
            "best_epoch": best_state.best_epoch + 1, "epochs_run": state.epoch + 1,
            **{f"valid_{k}": v for k, v in valid.items() if k != "rows"},
            **{f"test_{k}": v for k, v in test.items()},
            "min_count": cfg.data.min_count,
            "train_samples_per_s": float(np.mean(samples_per_s)) if samples_per_s else None,
            "peak_rss_mb_rank0": peak_mb,
            "embedding_mb_per_rank": self.embedding_mb_per_rank,
        }
        if env.is_main:
            (self.run_dir / "test_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
            if "test_regimes" in result:
                log.info("test metrics per regime (best epoch %d):\n%s", result["best_epoch"], regimes_table(result))
        return result

    def _fit_stage(self, stage: Stage, previous: Stage | None) -> list[float]:
        """Train ``stage`` to its end (or early stop); returns the samples/s of the epochs run now."""
        cfg = self.cfg
        ckpt = self.checkpointers[stage.name]
        state = RunState(best_value=stage.worst)
        if ckpt.exists("last"):
            state = self._restore("last")
            self._log(f"resumed from {ckpt.path('last')} after epoch {state.epoch + 1}"
                      + ("" if len(self.task.stages) == 1 else f" of stage {stage.name}"))
        elif previous is not None:
            self._restore("best", with_optimizer=False, stage=previous)
            self._log(f"stage {stage.name} starts from stage {previous.name}'s best checkpoint")
            if stage.name in cfg.train.fresh_embedding_optimizer:
                zero_fused_optimizer_state(self.model)
                self._log(f"stage {stage.name}: embedding optimizer state zeroed (train.fresh_embedding_optimizer)")
        lr = cfg.train.stage_embedding_lr.get(stage.name, cfg.optim.embedding_lr)
        set_fused_learning_rate(self.model, lr)
        if stage.name in cfg.train.stage_embedding_lr:
            self._log(f"stage {stage.name}: embedding learning rate {lr:g} (train.stage_embedding_lr)")
        epochs = self.stage_epochs(stage)
        samples_per_s = []
        while state.epoch + 1 < epochs and not state.stopped_early:
            epoch = state.epoch + 1
            train_loss, sps = self.train_epoch(epoch, state)
            samples_per_s.append(sps)
            valid = self.evaluate("valid")
            value = valid[stage.monitor]
            if value is None or not math.isfinite(value):
                rate = valid.get("positive_rate")
                why = (f": the validation split has one class (positive rate {rate:.0%}); check the dataset's "
                       "label rule" if rate in (0.0, 1.0) else "")
                raise FloatingPointError(f"stage {stage.name}, epoch {epoch + 1}: validation {stage.monitor} is "
                                         f"{value}{why}")
            state.epoch = epoch
            scalars = {f"valid_{k}": v for k, v in valid.items()
                       if k not in ("rows", "positive_rate", "gauc_users") and isinstance(v, int | float)}
            state.history.append({"epoch": epoch, "train_loss": train_loss, **scalars, "train_samples_per_s": sps})
            improved = stage.better(value, state.best_value)
            if improved:
                state.best_value, state.best_epoch, state.bad_epochs = value, epoch, 0
            else:
                state.bad_epochs += 1
                state.stopped_early = state.bad_epochs >= cfg.train.patience
            prefix = "" if len(self.task.stages) == 1 else f"{stage.name} "
            shown = ", ".join(f"{k.removeprefix('valid_')} {v:.4f}" for k, v in scalars.items()
                              if k != f"valid_{stage.monitor}")
            self._log(f"{prefix}epoch {epoch + 1}: train loss {train_loss:.4f}, valid {stage.monitor} {value:.4f}"
                      + (f", {shown}" if shown else "") + f", {sps:,.0f} samples/s"
                      + (" (best)" if improved else f" (no gain for {state.bad_epochs})"))
            if improved:
                self._save("best", state)
            self._save("last", state)
            self._write_progress(stage, state)
        if not ckpt.exists("best"):
            raise RuntimeError(f"stage {stage.name}: no epoch gave a validation {stage.monitor} "
                               f"({state.history[-1].get('valid_' + stage.monitor) if state.history else 'none'})")
        if state.stopped_early:
            self._log(f"{stage.name}: early stop, no better validation {stage.monitor} for {cfg.train.patience} "
                      "epoch(s)")
        self._write_progress(stage, state)
        return samples_per_s

    def _write_progress(self, stage: Stage, state: RunState) -> None:
        if not self.env.is_main or not state.history:
            return
        folder = self.stage_dir(stage)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(state.history[0]))
            w.writeheader()
            w.writerows(state.history)
        (folder / "metrics.json").write_text(json.dumps(vars(state), indent=1) + "\n")
        what = ", ".join(self.cfg.describe().values())
        title = f"{self.cfg.name} ({what}, {self.schema.name})" + (
            "" if len(self.task.stages) == 1 else f", stage {stage.name}")
        plot_curves(state.history, [tuple(x) for x in state.step_losses], folder / "curves.png", title,
                    monitor=stage.monitor)


def _first(*values: Any) -> Any:
    return next(v for v in values if v is not None)


def results_table(result: dict) -> str:
    rows = [("valid", result["valid_auc"], result["valid_logloss"]),
            ("test", result["test_auc"], result["test_logloss"])]
    out = [f"{result['backbone']} on {result['dataset']} (best epoch {result['best_epoch']}, seed {result['seed']})",
           f"{'split':<6} {'AUC':>8} {'logloss':>9}"]
    out += [f"{s:<6} {a:>8.4f} {ll:>9.4f}" for s, a, ll in rows]
    return "\n".join(out)


def _num(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def regimes_table(result: dict, split: str = "test") -> str:
    """Rows, AUC and logloss per regime, and GAUC, of a run's ``split``."""
    lines = [f"{'regime':<10} {'rows':>8} {'AUC':>8} {'logloss':>9}"]
    for name, r in result[f"{split}_regimes"].items():
        note = f"  ({r['note']})" if r.get("note") else ""
        lines.append(f"{name:<10} {r['rows']:>8,} {_num(r['auc']):>8} {_num(r['logloss']):>9}{note}")
    if f"{split}_gauc" in result:
        lines.append(f"{'GAUC':<10} {result.get(f'{split}_gauc_users', 0):>8,} {_num(result[f'{split}_gauc']):>8}"
                     "            (users with both classes)")
    return "\n".join(lines)
