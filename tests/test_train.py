"""The trainer: metrics, configuration errors, a real run, exact resume, and two gloo ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest
import torch

from recsys.data.prepare import prepare
from recsys.data.schema import load_schema
from recsys.experiment import ExperimentConfig, load_config
from recsys.train.config import ConfigError, apply_overrides, override
from recsys.train.metrics import auc, logloss

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory) -> Path:
    """The real MovieLens-100K from the recbole package, prepared once for this module."""
    out = tmp_path_factory.mktemp("data") / "ml-100k"
    prepare(load_schema("ml-100k"), out, progress=False)
    return out


def _cfg(data: Path, out: Path, *overrides: str) -> ExperimentConfig:
    base = [f"data.path={data}", f"train.out_dir={out}", "name=t", "data.batch_size=2048",
            "data.eval_batch_size=4096", "model.deepfm.hidden=[64,64]", "train.progress=false",
            "train.epochs=2", "train.patience=5", "train.max_steps_per_epoch=12"]
    return load_config(None, base + list(overrides))


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------


def test_auc_matches_pairwise_count_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (300,), generator=g).float()  # many ties
    labels = (torch.rand(300, generator=g) < 0.4).float()
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in product(pos.tolist(), neg.tolist()))
    assert auc(scores, labels) == pytest.approx(wins / (len(pos) * len(neg)), abs=1e-12)


def test_auc_and_logloss_edge_cases():
    assert auc(torch.tensor([0.1, 0.9]), torch.tensor([0.0, 1.0])) == 1.0
    assert auc(torch.tensor([0.9, 0.1]), torch.tensor([0.0, 1.0])) == 0.0
    assert torch.isnan(torch.tensor(auc(torch.tensor([0.3, 0.4]), torch.tensor([1.0, 1.0]))))
    assert logloss(torch.tensor([0.5, 0.5]), torch.tensor([0.0, 1.0])) == pytest.approx(0.693147, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: x\nmodel: {backbone: dcnv2, dcnv2: {num_cross_layers: 2}}\ntrain: {epochs: 3}\n")
    cfg = load_config(path, ["train.seed=7", "model.dcnv2.hidden=[32,16]", "optim.dense_lr=0.01"])
    assert (cfg.name, cfg.train.epochs, cfg.train.seed) == ("x", 3, 7)
    assert cfg.model.dcnv2.num_cross_layers == 2 and tuple(cfg.model.dcnv2.hidden) == (32, 16)
    assert cfg.optim.dense_lr == 0.01
    assert cfg.model.backbone_config() is cfg.model.dcnv2


@pytest.mark.parametrize("value", [{"warmup": 40, "pretrain": 4}, [1, 2], "x y", "a: b", 0.1, True, None])
def test_an_override_written_from_a_value_reads_back_as_that_value(value):
    assert apply_overrides({}, [override("train.x", value)]) == {"train": {"x": value}}


@pytest.mark.parametrize("overrides, message", [
    (["train.epoch=3"], "unknown key(s) ['epoch']"),
    (["model.deepfm.hiden=[1]"], "unknown key(s) ['hiden']"),
    (["train.epochs=three"], "expected int"),
    (["data.batch_size=1.5"], "expected int"),
    (["train"], "must look like section.key=value"),
])
def test_bad_config_is_refused_with_the_key_named(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides, message", [
    (["model.backbone=dlrm"], "model.backbone: 'dlrm' is not allowed; choose from"),
    (["model.embedding_dim=6"], "multiple of 4"),
    (["optim.embedding_optimizer=adam"], "GPUs only"),
    (["optim.embedding_optimizer=lamb"], "embedding_optimizer: 'lamb' is not allowed"),
    (["train.sharding_types=[row_wise]"], "row-wise sharding needs GPUs"),
    (["train.sharding_types=[data_parallel]"], "not be trained by the fused embedding optimizer"),
])
def test_bad_training_config_fails_before_training(ml100k, tmp_path, overrides, message):
    from recsys.experiment import build_trainer

    with pytest.raises(ConfigError, match=message):
        build_trainer(_cfg(ml100k, tmp_path, *overrides))
    assert not (tmp_path / "t" / "checkpoints").exists()


def test_batch_that_does_not_split_over_ranks_is_refused():
    from recsys.experiment import check_experiment
    from recsys.train.distributed import DistEnv

    env = DistEnv(rank=0, world_size=2, local_rank=0, local_world_size=2, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="must split evenly over 2 ranks"):
        check_experiment(load_config(None, ["data.batch_size=1025"]), env)


def test_missing_dataset_is_a_clear_error(tmp_path):
    from recsys.experiment import build_trainer

    with pytest.raises(FileNotFoundError, match="recsys.prepare"):
        build_trainer(_cfg(tmp_path / "nowhere", tmp_path))


# ----------------------------------------------------------------------------------------------
# training runs
# ----------------------------------------------------------------------------------------------


def test_training_run_writes_its_folder_and_learns(ml100k, tmp_path):
    from recsys.experiment import build_trainer

    result = build_trainer(_cfg(ml100k, tmp_path, "train.max_steps_per_epoch=0")).fit()
    run = tmp_path / "t"
    for name in ("config.yaml", "plan.txt", "metrics.csv", "metrics.json", "test_metrics.json", "curves.png"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "best" / "meta.json").is_file()
    assert result["test_rows"] == json.loads((ml100k / "schema.json").read_text())["counts"]["test"]
    assert 0.70 < result["test_auc"] < 1.0  # a real model on real data, well above chance
    plan = (run / "plan.txt").read_text()
    assert "t_item_id" in plan and "t_hist_item_id" not in plan  # the history shares the item table


def test_every_embedding_table_trains(ml100k, tmp_path):
    """Small tables too: a table the planner made data-parallel once silently kept its initial values."""
    from recsys.experiment import build_trainer
    from recsys.train.trainer import RunState

    trainer = build_trainer(_cfg(ml100k, tmp_path, "train.pipeline=false"))

    def tables() -> dict[str, torch.Tensor]:
        out = {}
        for name, t in trainer.model.state_dict().items():
            if ".embedding_bags." in name:
                out[name] = torch.cat([s.tensor.flatten() for s in t.local_shards()]) if hasattr(t, "local_shards") \
                    else t.flatten()
        return {k: v.clone() for k, v in out.items()}

    before = tables()
    trainer.train_epoch(0, RunState())
    after = tables()
    assert len(before) == 20  # DeepFM: 10 embedding tables and 10 first-order tables
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"tables that did not train: {unchanged}"
    assert "data_parallel" not in trainer.plan_text


def test_resume_reaches_the_same_result_as_an_uninterrupted_run(ml100k, tmp_path):
    from recsys.experiment import build_trainer

    straight = build_trainer(_cfg(ml100k, tmp_path / "a")).fit()
    build_trainer(_cfg(ml100k, tmp_path / "b", "train.epochs=1")).fit()  # "interrupted" after epoch 1
    # a half-written checkpoint (no meta.json) from a crash must be ignored
    (tmp_path / "b" / "t" / "checkpoints" / ".last.tmp").mkdir()
    resumed = build_trainer(_cfg(ml100k, tmp_path / "b")).fit()
    assert resumed["epochs_run"] == straight["epochs_run"] == 2
    for key in ("valid_auc", "valid_logloss", "test_auc", "test_logloss"):
        assert resumed[key] == straight[key], key
    history = json.loads((tmp_path / "b" / "t" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1]  # no epoch repeated, none lost


def test_same_seed_same_result_other_seed_differs(ml100k, tmp_path):
    from recsys.experiment import build_trainer

    a = build_trainer(_cfg(ml100k, tmp_path / "a", "train.epochs=1")).fit()
    b = build_trainer(_cfg(ml100k, tmp_path / "b", "train.epochs=1")).fit()
    c = build_trainer(_cfg(ml100k, tmp_path / "c", "train.epochs=1", "train.seed=5")).fit()
    assert a["test_auc"] == b["test_auc"]
    assert a["test_auc"] != c["test_auc"]


def test_existing_run_is_not_overwritten_without_resume(ml100k, tmp_path):
    from recsys.experiment import build_trainer

    build_trainer(_cfg(ml100k, tmp_path, "train.epochs=1")).fit()
    with pytest.raises(ConfigError, match="already holds a run"):
        build_trainer(_cfg(ml100k, tmp_path, "train.resume=false"))


def _torchrun_train(data: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``recsys.train`` on 2 gloo ranks with the settings of ``_cfg`` (so a 1-rank Trainer can take the run over)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "recsys.train", f"data.path={data}", f"train.out_dir={out}", "name=t", "data.batch_size=2048",
           "data.eval_batch_size=4096", "model.deepfm.hidden=[64,64]", "train.progress=false", "train.epochs=2",
           "train.patience=5", "train.max_steps_per_epoch=12", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.distributed
@pytest.mark.parametrize("sharding", ["table_wise", "column_wise"])
def test_two_gloo_ranks_train_export_and_move_to_one_rank(ml100k, tmp_path, sharding):
    """A run on 2 ranks is the same model exported, and on 1 rank: the export scores the test split to the
    run's reported AUC, and the run taken over by 1 rank evaluates to the same validation AUC."""
    from recsys.experiment import build_trainer
    from recsys.serve.artifact import export_run, load_exported
    from recsys.serve.score import score_file

    _torchrun_train(ml100k, tmp_path, "train.epochs=1", f"train.sharding_types=[{sharding}]")
    result = json.loads((tmp_path / "t" / "test_metrics.json").read_text())
    assert result["world_size"] == 2
    assert result["test_rows"] == json.loads((ml100k / "schema.json").read_text())["counts"]["test"]
    plan = (tmp_path / "t" / "plan.txt").read_text()
    assert sharding in plan
    if sharding == "table_wise":  # tables are spread over both ranks
        assert "[0]" in plan and "[1]" in plan
    else:  # each table split into column shards on both ranks
        assert "[0, 1]" in plan

    export = export_run(tmp_path / "t", tmp_path / "export")
    scored = score_file(load_exported(export), ml100k / "test.parquet", tmp_path / "scores.parquet", progress=False)
    assert scored["rows"] == result["test_rows"]
    assert abs(scored["auc"] - result["test_auc"]) <= 1e-6
    assert abs(scored["logloss"] - result["test_logloss"]) <= 1e-6

    moved = build_trainer(_cfg(ml100k, tmp_path, "train.epochs=1")).fit()  # 1 rank resumes the finished run
    assert moved["world_size"] == 1
    for key in ("valid_auc", "valid_logloss", "test_auc", "test_logloss"):
        assert abs(moved[key] - result[key]) <= 1e-6, key
    # the tables' memory is divided between the ranks (row-wise optimizer state is per shard: a little more)
    two, one = result["embedding_mb_per_rank"], moved["embedding_mb_per_rank"]
    assert len(two) == 2 and len(one) == 1
    assert one[0] <= sum(two) <= 1.15 * one[0] and max(two) < one[0]
    if sharding == "column_wise":  # every table halved
        assert all(0.45 * one[0] <= mb <= 0.6 * one[0] for mb in two), (two, one)


@pytest.mark.distributed
def test_one_rank_run_moved_to_two_ranks_evaluates_the_same_and_trains_on(ml100k, tmp_path):
    from recsys.experiment import build_trainer

    before = build_trainer(_cfg(ml100k, tmp_path, "train.epochs=1")).fit()
    _torchrun_train(ml100k, tmp_path, "train.epochs=1", "train.sharding_types=[table_wise]")
    moved = json.loads((tmp_path / "t" / "test_metrics.json").read_text())
    assert moved["world_size"] == 2 and "[1]" in (tmp_path / "t" / "plan.txt").read_text()
    for key in ("valid_auc", "valid_logloss", "test_auc", "test_logloss"):
        assert abs(moved[key] - before[key]) <= 1e-6, key
    # and it trains on from the moved checkpoint (optimizer state resharded by DCP)
    _torchrun_train(ml100k, tmp_path, "train.epochs=2", "train.sharding_types=[table_wise]")
    history = json.loads((tmp_path / "t" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1]
    assert history[0]["valid_auc"] == before["valid_auc"]
