"""TorchX components: AppDefs for each scheduler, argument checks, a real 2-rank local run, a lost rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch import components
from recsys.data.prepare import prepare
from recsys.data.schema import load_schema
from recsys.train.distributed import INIT_TIMEOUT_EXIT

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)
CONFIG = "recsys/configs/ml100k_deepfm.yaml"


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "ml-100k"
    prepare(load_schema("ml-100k"), out, progress=False)
    return out


def _torchx(*args: str, **kw) -> subprocess.Popen | subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", **kw.pop("env", {})}
    cmd = [f"{VENV_BIN}/torchx", *args]
    if kw.pop("background", False):
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=kw.get("timeout", 300))


# ----------------------------------------------------------------------------------------------
# AppDefs
# ----------------------------------------------------------------------------------------------


def test_train_cluster_appdef(ml100k):
    app = components.train_cluster(CONFIG, f"data.path={ml100k}", "train.seed=3", image="repo/llmctr:1", j="2x8",
                                   cpu=32, gpu=8, memMB=200_000, max_retries=2, max_restarts=3)
    (role,) = app.roles
    assert role.image == "repo/llmctr:1" and role.num_replicas == 2 and role.max_retries == 2
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (32, 8, 200_000)
    cmd = role.args[1]
    assert cmd.startswith("torchrun --max_restarts 3 ")
    assert "--nnodes 2 --nproc_per_node 8" in cmd
    assert f"-m recsys.train --config {CONFIG} data.path={ml100k} train.seed=3" in cmd
    assert role.env["OMP_NUM_THREADS"] == "4" and role.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"


def test_train_local_appdef_checks_the_dataset(ml100k, tmp_path):
    app = components.train_local(CONFIG, f"data.path={ml100k}", j="1x2")
    assert "--nproc_per_node 2" in app.roles[0].args[1] and app.roles[0].num_replicas == 1
    with pytest.raises(ValueError, match="not a prepared dataset"):
        components.train_local(CONFIG, f"data.path={tmp_path / 'missing'}")


@pytest.mark.parametrize("j, message", [("2x2", "a local run has one node"), ("1x0", "at least 1"),
                                        ("two", "expected"), ("1x3", "does not split over 3 ranks")])
def test_impossible_j_is_refused(ml100k, j, message):
    with pytest.raises(ValueError, match=message):
        components.train_local(CONFIG, f"data.path={ml100k}", j=j)


def test_bad_config_is_refused_before_launch(ml100k):
    with pytest.raises(ValueError, match="unknown key"):
        components.train_local(CONFIG, f"data.path={ml100k}", "train.epoch=3")


def test_prepare_and_embed_appdefs(ml100k):
    (role,) = components.prepare("ml-1m", "out/ml-1m", raw="/data/ml-1m").roles
    assert role.args[:2] == ["-m", "recsys.prepare"] and ["--raw", "/data/ml-1m"] == role.args[-2:]
    (role,) = components.embed("user", str(ml100k), "out/user", replicas=3).roles
    assert role.num_replicas == 3
    assert role.args[role.args.index("--shard") + 1] == "${replica_id}"
    assert role.args[role.args.index("--num-shards") + 1] == "3"
    with pytest.raises(ValueError, match="choose field, feature, user or item"):
        components.embed("movie", str(ml100k), "out")
    with pytest.raises(ValueError, match="not a prepared dataset"):
        components.embed("user", "/nowhere", "out")


def test_row_tokens_appdef(ml100k):
    (role,) = components.row_tokens(str(ml100k), "out/tokens", max_length=96).roles
    assert role.args[:2] == ["-m", "embedding_jobs.row_tokens"] and "96" in role.args
    with pytest.raises(ValueError, match="not a prepared dataset"):
        components.row_tokens("/nowhere", "out")


@pytest.mark.parametrize("scheduler, expected", [("kubernetes", "kind: Job"), ("slurm", "srun")])
def test_cluster_dryrun(ml100k, scheduler, expected):
    proc = _torchx("run", "-s", scheduler, "--dryrun", "--workspace", "", "launch/components.py:train_cluster",
                   "--image", "repo/llmctr:1", "--config", CONFIG, "-j", "2x8", f"data.path={ml100k}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert expected in proc.stdout and "recsys.train" in proc.stdout


# ----------------------------------------------------------------------------------------------
# real local runs
# ----------------------------------------------------------------------------------------------


def _run_args(ml100k: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "-s", "local_cwd", "--log", "launch/components.py:train_local", "--config", CONFIG, "-j", "1x2",
            *extra, f"data.path={ml100k}", f"train.out_dir={out}", "name=tx", "train.progress=false",
            "model.deepfm.hidden=[64,64]", "data.batch_size=2048", "train.patience=9"]


@pytest.mark.distributed
def test_two_ranks_through_torchx(ml100k, tmp_path):
    proc = _torchx(*_run_args(ml100k, tmp_path, "--max_restarts", "0"), "train.epochs=1")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads((tmp_path / "tx" / "test_metrics.json").read_text())
    assert result["world_size"] == 2 and result["test_auc"] > 0.6


@pytest.mark.distributed
@pytest.mark.parametrize("share_store", [True, False], ids=["shared_store", "store_per_round"])
def test_restarted_ranks_form_a_new_group_every_time(tmp_path, share_store):
    # torchrun's default shares one store across restarts, where a restarted gloo rank used to read the dead
    # rank's address (pytorch/pytorch#135712): it failed to connect or hung. Three restarts in a row.
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "PYTHONPATH": str(REPO), "KILLS": "3",
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0" if share_store else "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([f"{VENV_BIN}/torchrun", "--max_restarts", "3", "--nproc_per_node", "2", "--rdzv_backend",
                           "c10d", "--rdzv_endpoint", "localhost:0", str(REPO / "tests" / "restart_worker.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for attempt in range(4):
        for rank in (0, 1):
            assert f"attempt {attempt} rank {rank} formed" in out, out[-3000:]


def test_a_group_that_cannot_form_ends_the_process(tmp_path):
    # rank 0 of 2 with no rank 1 ever coming: the watchdog ends it after the bound instead of waiting forever
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "localhost", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "2",
           "RECSYS_DIST_INIT_TIMEOUT_S": "3", "PYTHONPATH": str(REPO)}
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", "from recsys.train.distributed import init_distributed; "
                           "init_distributed()"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == INIT_TIMEOUT_EXIT, proc.stderr[-2000:]
    assert time.time() - started < 60
    assert "rank 0: the process group was not formed within 3 s" in proc.stderr, proc.stderr[-2000:]


def _worker_pids(rank: int, run_marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"recsys.train" in cmd and f"RANK={rank}".encode() in env and any(run_marker.encode() in c for c in cmd):
            pids.append(int(proc.name))
    return pids


def _kill_rank_after_first_checkpoint(proc: subprocess.Popen, run_dir: Path, marker: str) -> None:
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "last" / "meta.json").is_file():
        assert proc.poll() is None and time.time() < deadline, "the job ended before its first checkpoint"
        time.sleep(0.2)
    pids = _worker_pids(1, marker)
    assert pids, "rank 1 not found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


@pytest.mark.distributed
def test_lost_rank_fails_fast_then_rerun_resumes(ml100k, tmp_path):
    args = _run_args(ml100k, tmp_path, "--max_restarts", "0") + ["train.epochs=4"]
    proc = _torchx(*args, background=True)
    _kill_rank_after_first_checkpoint(proc, tmp_path / "tx", str(tmp_path))
    killed_at = time.time()
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode != 0
    print(f"FAULT lost rank, no restart: the job failed {time.time() - killed_at:.1f} s after the SIGKILL")
    assert time.time() - killed_at < 120, "the job hung after losing a rank"
    assert "SIGKILL" in out and "rank" in out and "1" in out, out[-3000:]
    finished = json.loads((tmp_path / "tx" / "checkpoints" / "last" / "meta.json").read_text())["epoch"]
    assert finished >= 0
    # the rerun resumes: no finished epoch is trained again, none is lost
    rerun = _torchx(*_run_args(ml100k, tmp_path, "--max_restarts", "0"), "train.epochs=4")
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    history = json.loads((tmp_path / "tx" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert f"resumed from {tmp_path / 'tx' / 'checkpoints' / 'last'} after epoch {finished + 1}" in \
        rerun.stdout + rerun.stderr


@pytest.mark.distributed
def test_lost_rank_restarts_by_itself(ml100k, tmp_path):
    # One restart allowed, and one must do: the restarted ranks form a new group and resume (no retry hides a
    # failed re-rendezvous).
    args = _run_args(ml100k, tmp_path, "--max_restarts", "1") + ["train.epochs=3"]
    proc = _torchx(*args, background=True)
    _kill_rank_after_first_checkpoint(proc, tmp_path / "tx", str(tmp_path))
    killed_at = time.time()
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    print(f"FAULT lost rank, restarts: the job finished {time.time() - killed_at:.1f} s after the SIGKILL, "
          f"{out.count('resumed from')} restart(s)")
    assert out.count("resumed from") == 1, out[-3000:]  # the restarted ranks continued from the checkpoint
    history = json.loads((tmp_path / "tx" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]


@pytest.mark.distributed
def test_embed_with_two_replicas_equals_one_process(ml100k, tmp_path):
    from embedding_jobs.tiny_models import save_tiny_encoder
    from recsys.data.schema import PreparedSchema
    from recsys.features import load_feature_table

    model = save_tiny_encoder(tmp_path / "tiny-bert")
    tables = {}
    for replicas in (1, 2):
        out = tmp_path / f"r{replicas}"
        proc = _torchx("run", "-s", "local_cwd", "launch/components.py:embed", "--entity", "item", "--dataset",
                       str(ml100k), "--out", str(out), "--model", str(model), "--engine", "transformers",
                       "--replicas", str(replicas))
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        schema = PreparedSchema.load(ml100k)
        tables[replicas] = load_feature_table(out / "item", expect_fingerprint=schema.fingerprint,
                                              expect_entity="item", num_rows=schema.field("item_id").vocab_size)
    assert len(list((tmp_path / "r2" / "item" / "parts").glob("part-*.parquet"))) >= 2
    assert torch.equal(tables[1].embeddings, tables[2].embeddings)


def test_pipeline_dryrun_on_a_cluster_lists_every_step(tmp_path, capsys):
    from launch.pipeline import main

    assert main(["--scheduler", "slurm", "--image", "/shared/llmctr", "--root", str(tmp_path), "--dryrun"]) == 0
    out = capsys.readouterr().out
    titles = [line for line in out.splitlines() if line.startswith("=== ")]
    assert [t.split(" ===")[0][4:] for t in titles] == [
        "prepare", "fine-tune fields", "embed field", "adapt LM (ELEC)", "embed user", "embed item", "train base",
        "train llactr", "train ELEC gain", "distill ELEC student", "export student", "evaluate exported student",
        "train SRP4CTR", "encode histories", "export SRP4CTR", "evaluate exported SRP4CTR", "tokenise rows",
        "train ClickPrompt", "export ClickPrompt", "evaluate exported ClickPrompt"]
    assert out.count("srun") >= 12 and "embedding_jobs.field_finetune" in out and "method.name=llactr" in out
    assert "embedding_jobs.ctr_adapt" in out and "method.name=elec_gain" in out and "method.name=elec_student" in out
    assert "recsys.serve.export" in out and "recsys.serve.score" in out
    assert "method.name=srp4ctr" in out and "embedding_jobs.history_encodings" in out and "--history-cache" in out
    assert "embedding_jobs.row_tokens" in out and "method.name=clickprompt" in out
    assert "train.stage_steps={warmup: 40, pretrain: 40}" in out  # pre-training on a row budget


def test_pipeline_with_the_packaged_decoder_materialises_it_first(tmp_path, capsys):
    from launch.pipeline import main

    assert main(["--scheduler", "slurm", "--image", "/shared/llmctr", "--root", str(tmp_path), "--dryrun",
                 "--llm", "smollm2"]) == 0
    out = capsys.readouterr().out
    titles = [line.split(" ===")[0][4:] for line in out.splitlines() if line.startswith("=== ")]
    assert titles[:3] == ["prepare", "materialize smollm2", "fine-tune fields"]
    assert "embedding_jobs.materialize" in out and f"--model {tmp_path}/models/smollm2" in out
    with pytest.raises(ValueError, match="choose from"):
        components.materialize("llama-70b", "out")


def test_elec_appdefs_check_their_inputs(ml100k, tmp_path):
    (role,) = components.adapt_lm(str(ml100k), "out/elec", time_budget_s=60).roles
    assert role.args[:2] == ["-m", "embedding_jobs.ctr_adapt"] and "60" in role.args
    with pytest.raises(ValueError, match="not a finished gain-network run"):
        components.distill_local(CONFIG, str(tmp_path), f"data.path={ml100k}")
    app = components.distill_cluster(CONFIG, "/mnt/runs/gain", image="repo/llmctr:1", j="2x8")
    args = " ".join(app.roles[0].args)
    assert "method.name=elec_student" in args and "method.elec.teacher_run=/mnt/runs/gain" in args
    assert app.roles[0].num_replicas == 2
    with pytest.raises(ValueError, match="not a training run folder"):
        components.export(str(tmp_path), "out")
    (role,) = components.export("/mnt/runs/s", "/mnt/export/s", image="repo/llmctr:1").roles
    assert role.args[:2] == ["-m", "recsys.serve.export"]
    with pytest.raises(ValueError, match="not an exported model"):
        components.evaluate(str(tmp_path), str(ml100k / "test.parquet"), "out.parquet")


def test_srp4ctr_appdefs_check_their_inputs(tmp_path):
    with pytest.raises(ValueError, match="not a finished training run"):
        components.encode_histories(str(tmp_path), "out")
    (role,) = components.encode_histories("/mnt/runs/srp", "/mnt/cache", image="repo/llmctr:1").roles
    assert role.args[:2] == ["-m", "embedding_jobs.history_encodings"]
    (role,) = components.export("/mnt/runs/srp", "/mnt/export", history_cache="/mnt/cache", image="repo/llmctr:1").roles
    assert role.args[-2:] == ["--history-cache", "/mnt/cache"]
