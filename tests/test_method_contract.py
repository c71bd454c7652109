"""The method contract: every registered method on every backbone trains, evaluates and (where its spec says
so) exports through the one trainer; stages, parameter groups and per-position inputs work as the task
protocol says; and ``recsys.train`` knows no method."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sharded_state import embedding_weights, fbgemm_optimizer_state
from staged_task import PRETRAIN, StagedTask
from synthetic_tables import random_method_tables

from recsys.data.schema import PreparedSchema
from recsys.experiment import build_trainer, load_config
from recsys.methods import METHODS
from recsys.methods.registry import exportable
from recsys.models import BACKBONES
from recsys.train.config import ConfigError
from recsys.train.distributed import init_distributed
from recsys.train.trainer import Trainer, seed_everything

REPO = Path(__file__).resolve().parents[1]

# What each method reads upstream, made for the tiny dataset. A method registered without an entry here
# fails the contract test: add the fixture its inputs need.
UPSTREAM = {
    "none": lambda t, runs, b: [],
    "embedding_l2": lambda t, runs, b: ["method.embedding_l2.weight=0.001"],
    "llactr": lambda t, runs, b: [f"method.llactr.field_table={t['field']}"],
    "elec_gain": lambda t, runs, b: [f"method.elec.user_table={t['user']}", f"method.elec.item_table={t['item']}"],
    "elec_student": lambda t, runs, b: [f"method.elec.teacher_run={runs / f'{b}_elec_gain'}",
                                        "method.elec.rep_weight=1"],
    "din": lambda t, runs, b: [],
    "srp4ctr": lambda t, runs, b: ["method.srp4ctr.queries=2"],
    "clickprompt": lambda t, runs, b: [f"method.clickprompt.tokens={t['tokens']}", f"method.clickprompt.plm={t['plm']}",
                                       "method.clickprompt.prompt_length=2", "method.clickprompt.warmup=false"],
}
ORDER = sorted(METHODS, key=lambda m: m == "elec_student")  # a student's teacher run is trained first


def _history_cache(run: Path, tmp: Path) -> dict[str, str]:
    from embedding_jobs.history_encodings import run as encode

    encode(run, tmp / f"{run.name}_cache", progress=False)
    return {"history_cache": str(tmp / f"{run.name}_cache")}


# What each method whose spec has an export_task reads at export, made from its finished run
EXPORT_INPUTS = {"srp4ctr": _history_cache}


def _cfg(data: Path, out: Path, name: str, *overrides: str):
    return load_config(None, [f"data.path={data}", f"train.out_dir={out}", f"name={name}", "data.batch_size=16",
                              "data.eval_batch_size=32", "model.embedding_dim=8", "train.progress=false",
                              "train.epochs=1", "train.max_steps_per_epoch=2", *overrides])


def test_every_method_has_a_contract_fixture():
    assert set(UPSTREAM) == set(METHODS), f"add an UPSTREAM entry for {sorted(set(METHODS) - set(UPSTREAM))}"
    served = {m for m, spec in METHODS.items() if spec.export_task is not None}
    assert served == set(EXPORT_INPUTS), f"add an EXPORT_INPUTS entry for {sorted(served - set(EXPORT_INPUTS))}"


@pytest.fixture(scope="module")
def inputs(tiny_prepared, tmp_path_factory) -> dict[str, Path]:
    """What the methods read upstream, made once for the tiny dataset: feature tables, a tiny masked LM and
    the row tokens of its tokenizer."""
    from embedding_jobs.row_tokens import run as make_row_tokens
    from embedding_jobs.tiny_models import save_tiny_masked_lm

    _, data, _ = tiny_prepared
    root = tmp_path_factory.mktemp("inputs")
    made = random_method_tables(root / "tables", PreparedSchema.load(data))
    made["plm"] = save_tiny_masked_lm(root / "plm", hidden=32)
    made["tokens"] = root / "tokens"
    make_row_tokens(data, made["tokens"], made["plm"], max_length=64, history_values=2, progress=False)
    return made


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_every_method_trains_evaluates_and_exports(tiny_prepared, inputs, tmp_path, backbone):
    from recsys.serve.artifact import export_run, load_exported
    from recsys.serve.score import score_file

    _, data, _ = tiny_prepared
    tables = inputs
    for method in ORDER:
        name = f"{backbone}_{method}"
        cfg = _cfg(data, tmp_path, name, f"model.backbone={backbone}", f"method.name={method}",
                   *UPSTREAM[method](tables, tmp_path, backbone))
        trainer = build_trainer(cfg)
        step = next(trainer._steps(iter(trainer.train_batches)))  # one train step through the pipeline
        assert set(step) >= {"loss", "weights"} and torch.isfinite(step["loss"])
        result = trainer.fit()
        assert 0.0 <= result["test_auc"] <= 1.0 and result["method"] == method, name
        if exportable(cfg) or METHODS[method].export_task is not None:
            inputs = EXPORT_INPUTS[method](tmp_path / name, tmp_path) if method in EXPORT_INPUTS else {}
            export = export_run(tmp_path / name, tmp_path / "export" / name, inputs=inputs)
            scored = score_file(load_exported(export), data / "test.parquet", tmp_path / f"{name}.parquet",
                                progress=False)
            assert abs(scored["auc"] - result["test_auc"]) <= 1e-6, name  # the export is the run's model
        else:
            with pytest.raises(ConfigError, match="whose served model needs more than recsys"):
                export_run(tmp_path / name, tmp_path / "export" / name)


def test_the_trainer_imports_no_method():
    code = ("import sys, recsys.train.trainer, recsys.train.__main__; "
            "print([m for m in sys.modules if m.startswith('recsys.methods') or m == 'recsys.experiment'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_typed_options_name_the_allowed_values():
    with pytest.raises(ConfigError, match=r"method.elec.score_loss: 'kld' is not allowed; choose from \['kl', 'mse'\]"):
        load_config(None, ["method.elec.score_loss=kld"])
    with pytest.raises(ConfigError, match="method.name: 'nope' is not allowed"):
        load_config(None, ["method.name=nope"])
    with pytest.raises(ConfigError, match=r"optim.groups.plm.schedule: 'step' is not allowed"):
        load_config(None, ["optim.groups={plm: {schedule: step}}"])
    cfg = load_config(None, ["method.elec.inject=fields", "optim.groups={head: {lr: 0.5}}"])
    assert cfg.method.elec.inject == "fields" and cfg.optim.groups["head"].lr == 0.5
    assert cfg.to_dict()["method"]["elec"]["inject"] == "fields"  # written back as plain YAML


# ----------------------------------------------------------------------------------------------
# Stages, parameter groups, per-position inputs
# ----------------------------------------------------------------------------------------------
def _staged(data: Path, out: Path, *overrides: str) -> Trainer:
    cfg = _cfg(data, out, "staged", "train.epochs=2", "train.patience=5", "train.max_steps_per_epoch=3",
               "model.backbone=dcnv2", *overrides)
    env = init_distributed()
    schema = PreparedSchema.load(data)
    seed_everything(cfg.train.seed)
    return Trainer(cfg, StagedTask(schema, cfg), env, schema)


def test_stages_run_in_order_with_their_own_checkpoints_monitors_and_groups(tiny_prepared, tmp_path):
    _, data, _ = tiny_prepared
    trainer = _staged(data, tmp_path, "optim.groups={head: {lr: 0.02}}", "train.stage_epochs={pretrain: 3}")
    assert [g.name for g in trainer.groups] == ["dense", "head"]
    assert trainer.groups[1].lr == 0.02 and trainer.groups[1].schedule == "linear"  # config over task default
    result = trainer.fit()
    run = tmp_path / "staged"
    pre = run / "stages" / "pretrain"
    for folder in (pre, run):
        for name in ("metrics.csv", "metrics.json", "curves.png", "checkpoints/best/meta.json"):
            assert (folder / name).exists(), folder / name
    history = json.loads((pre / "metrics.json").read_text())["history"]
    assert len(history) == 3 and "valid_mse" in history[0] and "valid_auc" not in history[0]
    assert json.loads((run / "metrics.json").read_text())["history"][0]["valid_auc"] == pytest.approx(
        json.loads((run / "metrics.csv").read_text().splitlines()[1].split(",")[2]))
    best = json.loads((pre / "checkpoints" / "best" / "meta.json").read_text())
    assert best["best_value"] == min(h["valid_mse"] for h in history)  # lower is better for this monitor
    assert result["epochs_run"] == 2 and 0 <= result["test_auc"] <= 1
    # the head's schedule: warm-up then linear decay to zero over the stage's steps
    assert trainer.groups[1].optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_a_stage_starts_from_the_previous_stages_best_weights(tiny_prepared, tmp_path):
    from recsys.train.checkpoint import load_part

    _, data, _ = tiny_prepared
    trainer = _staged(data, tmp_path, "train.epochs=1")
    trainer.fit()
    # the CTR stage's first epoch started from pretrain/best: its saved best weights differ from it only by
    # what one epoch of CTR training changed, and the head (unused by the CTR loss) not at all
    pre_best = tmp_path / "staged" / "stages" / "pretrain" / "checkpoints" / "best"
    ctr_best = tmp_path / "staged" / "checkpoints" / "best"
    a = StagedTask(PreparedSchema.load(data), trainer.cfg, device=torch.device("cpu"))
    b = StagedTask(PreparedSchema.load(data), trainer.cfg, device=torch.device("cpu"))
    load_part(pre_best, a)
    load_part(ctr_best, b)
    for k, v in a.state_dict().items():
        if k.startswith("head."):
            torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=0)


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize("after_epochs", [1, 2, 3, 4])  # pre-training: mid, last epoch; fine-tuning: mid, last
def test_a_run_interrupted_in_any_stage_resumes_to_the_same_result(tiny_prepared, tmp_path, monkeypatch,
                                                                     after_epochs):
    _, data, _ = tiny_prepared
    straight = _staged(data, tmp_path / "a").fit()
    # stop the job right after its after_epochs-th checkpointed epoch, as a kill would
    written = Trainer._write_progress
    count = {"epochs": 0}

    def stop_after(self, stage, state):
        written(self, stage, state)
        count["epochs"] += 1
        if count["epochs"] == after_epochs:
            raise _Interrupted

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_write_progress", stop_after)
        with pytest.raises(_Interrupted):
            _staged(data, tmp_path / "b").fit()
    resumed = _staged(data, tmp_path / "b").fit()
    for key in ("valid_auc", "valid_logloss", "test_auc", "test_logloss"):
        assert resumed[key] == straight[key], key
    for sub in ("stages/pretrain/metrics.json", "metrics.json"):
        a = json.loads((tmp_path / "a" / "staged" / sub).read_text())["history"]
        b = json.loads((tmp_path / "b" / "staged" / sub).read_text())["history"]
        assert [h["epoch"] for h in b] == [h["epoch"] for h in a]  # no epoch repeated, none lost
        assert [h["train_loss"] for h in b] == [h["train_loss"] for h in a], sub


@pytest.mark.parametrize("fresh", [False, True], ids=["carried", "fresh"])
def test_a_run_killed_before_the_next_stages_first_checkpoint_resumes_to_the_same_result(tiny_prepared, tmp_path,
                                                                                          monkeypatch, fresh):
    """Killed after pre-training finished, inside fine-tuning's first epoch: the resumed process must start
    fine-tuning with the embedding optimizer's state (Adagrad's sums) as pre-training left it, as one process does
    (or zeroed, where the stage asks for a fresh optimizer)."""
    _, data, _ = tiny_prepared
    overrides = ["train.fresh_embedding_optimizer=[ctr]"] if fresh else []
    straight = _staged(data, tmp_path / "a", *overrides).fit()
    train_epoch = Trainer.train_epoch

    def killed_in_fine_tuning(self, epoch, state):
        if self.stage.name == "ctr":
            raise _Interrupted
        return train_epoch(self, epoch, state)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_epoch", killed_in_fine_tuning)
        with pytest.raises(_Interrupted):
            _staged(data, tmp_path / "b", *overrides).fit()
    assert not (tmp_path / "b" / "staged" / "checkpoints" / "last").exists()  # no fine-tuning epoch was saved
    resumed = _staged(data, tmp_path / "b", *overrides).fit()
    a = json.loads((tmp_path / "a" / "staged" / "metrics.json").read_text())["history"]
    b = json.loads((tmp_path / "b" / "staged" / "metrics.json").read_text())["history"]
    assert [h["train_loss"] for h in b] == [h["train_loss"] for h in a]
    for key in ("valid_auc", "test_auc", "test_logloss"):
        assert resumed[key] == straight[key], key


def test_a_stage_named_fresh_starts_with_zeroed_embedding_optimizer_state(tiny_prepared, tmp_path, monkeypatch):
    _, data, _ = tiny_prepared
    at_start: dict[str, float] = {}
    train_epoch = Trainer.train_epoch

    def spy(self, epoch, state):
        if self.stage.name == "ctr" and self.cfg.train.out_dir not in at_start:
            at_start[self.cfg.train.out_dir] = sum(float(t.abs().sum()) for t in fbgemm_optimizer_state(self.model))
        return train_epoch(self, epoch, state)

    monkeypatch.setattr(Trainer, "train_epoch", spy)
    _staged(data, tmp_path / "a").fit()
    _staged(data, tmp_path / "b", "train.fresh_embedding_optimizer=[ctr]").fit()
    assert at_start[str(tmp_path / "a")] > 0  # pre-training's sums, carried into fine-tuning by default
    assert at_start[str(tmp_path / "b")] == 0
    losses = [[h["train_loss"] for h in json.loads((tmp_path / run / "staged" / "metrics.json").read_text())["history"]]
              for run in ("a", "b")]
    assert losses[0][0] != losses[1][0]  # the kernels step with the zeroed sums
    with pytest.raises(ConfigError, match="unknown stage"):
        _staged(data, tmp_path / "c", "train.fresh_embedding_optimizer=[fine_tune]")


def test_a_stage_can_take_its_own_embedding_learning_rate(tiny_prepared, tmp_path, monkeypatch):
    """At rate 0 in pre-training the tables leave it as they entered (the dense layers learn); the CTR stage
    then trains them at optim.embedding_lr."""
    _, data, _ = tiny_prepared
    weights: list[torch.Tensor] = []
    train_epoch = Trainer.train_epoch

    def spy(self, epoch, state):
        if not weights or self.stage.name == "ctr" and len(weights) == 1:
            weights.append(embedding_weights(self.model).clone())
        return train_epoch(self, epoch, state)

    monkeypatch.setattr(Trainer, "train_epoch", spy)
    trainer = _staged(data, tmp_path, "train.stage_embedding_lr={pretrain: 0.0}")
    trainer.fit()
    assert len(weights) == 2 and torch.equal(weights[0], weights[1])  # pre-training left the tables alone
    assert not torch.equal(embedding_weights(trainer.model), weights[1])  # fine-tuning moved them
    assert trainer.model.fused_optimizer.param_groups[0]["lr"] == trainer.cfg.optim.embedding_lr


def test_a_stage_can_take_its_own_dense_group_learning_rate(tiny_prepared, tmp_path, monkeypatch):
    """At rate 0 in pre-training a dense group leaves it as it entered while the tables learn; the rate is the
    stage's alone (the group's own rate comes back in the next stage)."""
    _, data, _ = tiny_prepared
    seen: dict[str, tuple] = {}
    train_epoch = Trainer.train_epoch

    def spy(self, epoch, state):
        if self.stage.name not in seen:
            seen[self.stage.name] = ({g.name: g.lr for g in self.groups}, embedding_weights(self.model).clone())
        return train_epoch(self, epoch, state)

    monkeypatch.setattr(Trainer, "train_epoch", spy)
    trainer = _staged(data, tmp_path, "train.stage_group_lr={pretrain: {head: 0.0}}")
    head = [p.detach().clone() for p in trainer.task.head.parameters()]
    trainer.fit()
    assert seen["pretrain"][0]["head"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(head, trainer.task.head.parameters(), strict=True))
    assert not torch.equal(seen["pretrain"][1], seen["ctr"][1])  # the tables learned in pre-training
    assert seen["ctr"][0]["head"] == 0.01  # the task's default for the group, outside the stage
    moved = _staged(data, tmp_path / "moved")
    before = [p.detach().clone() for p in moved.task.head.parameters()]
    moved.fit()
    assert not all(torch.equal(a, b) for a, b in zip(before, moved.task.head.parameters(), strict=True))
    with pytest.raises(ConfigError, match=r"train.stage_group_lr.pretrain names unknown parameter group\(s\) \['plm'\]"):
        _staged(data, tmp_path / "x", "train.stage_group_lr={pretrain: {plm: 0.0}}")
    with pytest.raises(ConfigError, match="unknown stage"):
        _staged(data, tmp_path / "y", "train.stage_group_lr={fine_tune: {head: 0.0}}")


def test_unknown_stage_or_group_names_are_refused(tiny_prepared, tmp_path):
    _, data, _ = tiny_prepared
    with pytest.raises(ConfigError, match="unknown stage"):
        _staged(data, tmp_path, "train.stage_epochs={pretrian: 2}")
    with pytest.raises(ConfigError, match="unknown parameter group"):
        _staged(data, tmp_path, "optim.groups={plm: {lr: 0.1}}")
    assert PRETRAIN.better(0.1, 0.2) and not PRETRAIN.better(0.3, 0.2)


@pytest.mark.distributed
def test_two_ranks_run_both_stages(tiny_prepared, tmp_path):
    """DDP sees a different set of parameters in each stage; the sequence tables are sharded."""
    _, data, _ = tiny_prepared
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "staged_worker.py"), str(data), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "staged" / "test_metrics.json").read_text())
    assert result["world_size"] == 2 and 0 <= result["test_auc"] <= 1
    plan = (tmp_path / "staged" / "plan.txt").read_text()
    assert "t_item_id" in plan and "[1]" in plan
    assert (tmp_path / "staged" / "stages" / "pretrain" / "stage.json").is_file()


def test_a_stage_can_take_its_own_batch_size_and_validation_budget(tiny_prepared, tmp_path):
    _, data, _ = tiny_prepared
    trainer = _staged(data, tmp_path, "train.stage_batch_size={pretrain: 8}", "train.stage_eval_steps={pretrain: 1}")
    assert trainer.train_batches.batch_size == 8
    trainer.fit()
    assert trainer.train_batches.batch_size == 16  # the CTR stage: data.batch_size
    with pytest.raises(ConfigError, match="final stage"):
        _staged(data, tmp_path / "x", "train.stage_eval_steps={ctr: 1}")
