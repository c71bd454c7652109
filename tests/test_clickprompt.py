"""ClickPrompt: row tokens, prompt shapes, BERT masking, PA-MLM through the one trainer, the two fine-tuning
modes, the language-model-free export of mode (b), and resuming a pre-training stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
from sharded_state import embedding_weights, fbgemm_optimizer_state

from embedding_jobs.row_tokens import run as make_row_tokens
from embedding_jobs.tiny_models import save_tiny_masked_lm
from recsys.data.schema import PreparedSchema
from recsys.experiment import build_task, build_trainer, load_config
from recsys.methods.clickprompt import IGNORE, PromptedMLM, bert_mask
from recsys.train.config import ConfigError
from recsys.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tiny_prepared, tmp_path_factory):
    """A tiny masked LM (with its head) and the tiny dataset's row tokens made with its tokenizer."""
    _, data, _ = tiny_prepared
    root = tmp_path_factory.mktemp("clickprompt")
    plm = save_tiny_masked_lm(root / "plm")
    make_row_tokens(data, root / "tokens", plm, max_length=64, history_values=2, progress=False)
    return data, plm, root / "tokens"


def _cfg(setup, out: Path, name: str, *overrides: str):
    data, plm, tokens = setup
    return load_config(None, [f"data.path={data}", f"train.out_dir={out}", f"name={name}", "data.batch_size=16",
                              "data.eval_batch_size=32", "model.embedding_dim=8", "model.backbone=dcnv2",
                              "train.progress=false", "train.epochs=2", "train.patience=5", "method.name=clickprompt",
                              f"method.clickprompt.tokens={tokens}", f"method.clickprompt.plm={plm}",
                              "method.clickprompt.prompt_length=3", "method.clickprompt.warmup=false",
                              "optim.groups={plm: {lr: 0.01}}", *overrides])


def test_row_tokens_are_aligned_with_the_splits(setup):
    data, _, tokens = setup
    meta = json.loads((tokens / "meta.json").read_text())
    assert meta["dataset_fingerprint"] == PreparedSchema.load(data).fingerprint
    for split in ("train", "valid", "test"):
        a, b = pq.ParquetFile(data / f"{split}.parquet"), pq.ParquetFile(tokens / f"{split}.parquet")
        assert [a.metadata.row_group(g).num_rows for g in range(a.metadata.num_row_groups)] == \
               [b.metadata.row_group(g).num_rows for g in range(b.metadata.num_row_groups)]
        assert meta["splits"][split]["rows"] == a.metadata.num_rows


def test_rows_longer_than_the_limit_are_cut_and_counted(setup, tmp_path):
    data, plm, tokens = setup
    full = pq.read_table(tokens / "valid.parquet").column("length").to_numpy()
    meta = make_row_tokens(data, tmp_path / "short", plm, max_length=16, history_values=2, progress=False)
    short = pq.read_table(tmp_path / "short" / "valid.parquet").column("length").to_numpy()
    assert meta["splits"]["valid"]["truncated"] == int((full > 16).sum()) > 0
    assert short.max() <= 16 and (short == full.clip(max=16)).all()


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_prompts_have_a_shape_for_every_layer(setup, kind):
    from transformers import BertForMaskedLM

    _, plm_folder, _ = setup
    cfg = _cfg(setup, Path("/tmp"), "x", f"method.clickprompt.prompt={kind}").method.clickprompt
    mlm = BertForMaskedLM.from_pretrained(plm_folder)
    plm = PromptedMLM(mlm, rep_dim=12, cfg=cfg, special_ids=[101, 102, 0], mask_id=103, pad_id=0)
    rep = torch.randn(4, 12)
    if kind == "prefix":
        kv = plm.generator(rep).view(4, plm.layers, 2, plm.heads, plm.length, plm.head_dim)
        assert kv.shape == (4, 2, 2, 2, 3, 32)  # batch, layers, key/value, heads, prompt length, head size
    else:
        assert len(plm.generator) == 3 and plm.generator[0](rep).shape == (4, 64)
    ids = torch.randint(1000, 2000, (4, 9))
    hidden = plm._encode(rep, ids, torch.ones(4, 9, dtype=torch.bool))
    assert hidden.shape == (4, 9, 64)  # the text's positions only, prompts in front of them
    assert not torch.allclose(hidden, plm._encode(None, ids, torch.ones(4, 9, dtype=torch.bool)), atol=1e-4)


def test_masking_spares_special_tokens_and_masks_about_15_percent():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (512, 64), generator=g)
    ids[:, 0], ids[:, 40] = 101, 102  # [CLS] and [SEP]
    attention = (torch.arange(64).unsqueeze(0) <= 40).expand(512, 64)
    special = torch.isin(ids, torch.tensor([101, 102, 0]))
    masked, labels = bert_mask(ids, attention, special, 103, 30522, 0.15, g)
    chosen = labels != IGNORE
    assert not chosen[special].any() and not chosen[~attention].any()
    assert torch.equal(masked[~chosen], ids[~chosen])
    share = chosen.sum() / (attention & ~special).sum()
    assert 0.14 < share < 0.16
    became = masked[chosen]
    assert 0.77 < (became == 103).float().mean() < 0.83  # 80% [MASK]
    assert 0.08 < (became == ids[chosen]).float().mean() < 0.12  # 10% unchanged (and a few random hits)


def test_mlm_gradients_reach_the_ctr_embeddings_through_the_prompts(setup):
    from recsys.data.loader import ParquetBatches
    from recsys.methods.clickprompt import PRETRAIN

    data, _, _ = setup
    cfg = _cfg(setup, Path("/tmp"), "x")
    task = build_task(PreparedSchema.load(data), cfg, device=torch.device("cpu"))
    task.set_stage(PRETRAIN)
    batch = next(iter(ParquetBatches(data, "train", PreparedSchema.load(data), 16,
                                     side_files=task.side_files("train"))))
    loss, step = task(batch)
    loss.backward()
    table = task.model.sparse_arch.ebc.embedding_bags["t_item_id"].weight
    assert step["tokens"] > 0 and table.grad is not None and table.grad.abs().sum() > 0


@pytest.mark.parametrize("finetune", ["ctr", "joint"])
def test_pa_mlm_then_fine_tuning_through_the_trainer(setup, tmp_path, finetune):
    cfg = _cfg(setup, tmp_path, "cp", f"method.clickprompt.finetune={finetune}", "train.stage_epochs={pretrain: 3}")
    result = build_trainer(cfg).fit()
    history = json.loads((tmp_path / "cp" / "stages" / "pretrain" / "metrics.json").read_text())["history"]
    assert history[-1]["valid_mlm_loss"] < history[0]["valid_mlm_loss"]  # PA-MLM learns
    assert 0 <= result["test_auc"] <= 1
    if finetune == "joint":
        with pytest.raises(ConfigError, match="whose served model needs more than recsys"):
            from recsys.serve.artifact import export_run

            export_run(tmp_path / "cp", tmp_path / "export")


def test_mode_a_and_its_control_from_a_finished_b_run_start_at_its_scores_and_run_one_stage(setup, tmp_path):
    from recsys.data.loader import ParquetBatches
    from recsys.train.checkpoint import load_part, load_warm_start

    data, _, _ = setup
    b = build_trainer(_cfg(setup, tmp_path, "b", "train.epochs=1"))
    b.fit()
    a_cfg = _cfg(setup, tmp_path, "a", "method.clickprompt.finetune=joint",
                 f"method.clickprompt.start_from={tmp_path / 'b'}", "train.epochs=1")
    schema = PreparedSchema.load(data)
    b_task, a_task = (build_task(schema, c, device=torch.device("cpu"))
                      for c in (load_config(tmp_path / "b" / "config.yaml"), a_cfg))
    load_part(tmp_path / "b" / "checkpoints" / "best", b_task)
    load_warm_start(a_task.warm_start(), a_task)
    assert [s.name for s in a_task.stages] == ["ctr"]
    batch = next(iter(ParquetBatches(data, "test", schema, 32, side_files=a_task.side_files("test"))))
    b_task.eval(), a_task.eval()
    with torch.no_grad():
        torch.testing.assert_close(a_task.score(batch), b_task.score(batch))  # the PLM adds nothing yet
    result = build_trainer(a_cfg).fit()
    assert not (tmp_path / "a" / "stages").exists() and 0 <= result["test_auc"] <= 1
    with pytest.raises(ConfigError, match="differs in model.backbone"):
        build_trainer(_cfg(setup, tmp_path, "a2", "method.clickprompt.finetune=joint", "model.backbone=deepfm",
                           f"method.clickprompt.start_from={tmp_path / 'b'}"))
    # the control: the (b) run's CTR model trained on, without the PLM, starts where (b) ended too
    control = _cfg(setup, tmp_path, "c", f"method.clickprompt.start_from={tmp_path / 'b'}", "train.epochs=1")
    c_task = build_task(schema, control, device=torch.device("cpu"))
    assert set(c_task.warm_start()) == {"model."} and [s.name for s in c_task.stages] == ["ctr"]
    load_warm_start(c_task.warm_start(), c_task)
    c_task.eval()
    with torch.no_grad():
        torch.testing.assert_close(c_task.score(batch), b_task.score(batch))


def test_mode_a_with_the_ctr_model_frozen_trains_only_the_language_side(setup, tmp_path):
    from recsys.train.checkpoint import load_part

    data, _, _ = setup
    build_trainer(_cfg(setup, tmp_path, "b", "train.epochs=1")).fit()
    frozen = _cfg(setup, tmp_path, "a", "method.clickprompt.finetune=joint", "train.epochs=1",
                  f"method.clickprompt.start_from={tmp_path / 'b'}", "optim.embedding_lr=0",
                  "optim.groups={dense: {lr: 0.0}, plm: {lr: 0.01}}")
    build_trainer(frozen).fit()
    schema = PreparedSchema.load(data)
    b, a = (build_task(schema, frozen, device=torch.device("cpu")) for _ in range(2))
    load_part(tmp_path / "b" / "checkpoints" / "best", b, target_prefix="model.", source_prefix="model.")
    load_part(tmp_path / "a" / "checkpoints" / "best", a)
    for name, tensor in b.model.state_dict().items():
        torch.testing.assert_close(a.model.state_dict()[name], tensor, msg=f"{name} moved")
    assert a.plm.score_head[-1].weight.abs().sum() > 0  # the scoring head left zero: the language side learned


def test_mode_b_exports_and_scores_without_transformers(setup, tmp_path):
    from recsys.serve.artifact import export_run

    cfg = _cfg(setup, tmp_path, "cp", "train.epochs=1")
    result = build_trainer(cfg).fit()
    export_run(tmp_path / "cp", tmp_path / "export")
    data, _, _ = setup
    code = ("import sys, builtins, json\n"
            "real = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name.split('.')[0] in ('transformers', 'vllm', 'embedding_jobs'):\n"
            "        raise ImportError('blocked: ' + name)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            "from recsys.serve.artifact import load_exported\n"
            "from recsys.serve.score import score_file\n"
            f"r = score_file(load_exported({str(tmp_path / 'export')!r}), {str(data / 'test.parquet')!r}, "
            f"{str(tmp_path / 's.parquet')!r}, progress=False)\n"
            "print(json.dumps({'auc': r['auc']}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert abs(json.loads(out.stdout.strip().splitlines()[-1])["auc"] - result["test_auc"]) <= 1e-6


def test_a_model_without_an_mlm_head_needs_the_warm_up(setup, tmp_path):
    from embedding_jobs.tiny_models import save_tiny_encoder

    headless = save_tiny_encoder(tmp_path / "headless", hidden=64)
    with pytest.raises(ConfigError, match="has no trained MLM head"):
        build_trainer(_cfg(setup, tmp_path, "cp", f"method.clickprompt.plm={headless}"))


def test_bad_options_and_foreign_tokens_are_refused(setup, tmp_path):
    with pytest.raises(ConfigError, match="prompt_length=0"):
        build_trainer(_cfg(setup, tmp_path, "cp", "method.clickprompt.prompt_length=0"))
    with pytest.raises(ConfigError, match="row tokens made with the tokenizer of"):
        from embedding_jobs.tiny_models import save_tiny_decoder

        other = save_tiny_decoder(tmp_path / "dec", corpus=["a b c"] * 10, vocab_size=300)
        build_trainer(_cfg(setup, tmp_path, "cp", f"method.clickprompt.plm={other}"))


def test_a_tokenizer_without_a_mask_token_is_refused(setup, tmp_path):
    data, _, _ = setup
    plm = save_tiny_masked_lm(tmp_path / "plm")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # a tokenizer that cannot mask
        spec = json.loads((plm / name).read_text())
        spec["mask_token"] = None
        (plm / name).write_text(json.dumps(spec))
    make_row_tokens(data, tmp_path / "tokens", plm, max_length=64, history_values=2, progress=False)
    with pytest.raises(ConfigError, match="the tokenizer has no mask token"):
        build_trainer(_cfg(setup, tmp_path, "cp", f"method.clickprompt.plm={plm}",
                           f"method.clickprompt.tokens={tmp_path / 'tokens'}"))


def test_a_killed_pre_training_resumes_where_it_stopped(setup, tmp_path, monkeypatch):
    straight = build_trainer(_cfg(setup, tmp_path / "a", "cp")).fit()
    written, count = Trainer._write_progress, {"n": 0}

    def stop_after_first_epoch(self, stage, state):
        written(self, stage, state)
        count["n"] += 1
        if count["n"] == 1:
            raise KeyboardInterrupt  # as a kill after the first pre-training epoch's checkpoint

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_write_progress", stop_after_first_epoch)
        with pytest.raises(KeyboardInterrupt):
            build_trainer(_cfg(setup, tmp_path / "b", "cp")).fit()
    resumed = build_trainer(_cfg(setup, tmp_path / "b", "cp")).fit()
    assert resumed["test_auc"] == straight["test_auc"] and resumed["test_logloss"] == straight["test_logloss"]
    a, b = (json.loads((tmp_path / x / "cp" / "stages" / "pretrain" / "metrics.json").read_text())["history"]
            for x in ("a", "b"))
    assert [h["valid_mlm_loss"] for h in a] == [h["valid_mlm_loss"] for h in b]



@pytest.mark.parametrize(("variant", "override"), [("clickprompt_b_fresh", "train.fresh_embedding_optimizer=[ctr]"),
                                                   ("clickprompt_b_dense_pretrained",
                                                    "train.stage_embedding_lr={pretrain: 0.0}"),
                                                   ("clickprompt_b_tables_pretrained",
                                                    "train.stage_group_lr={pretrain: {dense: 0.0}}")])
def test_a_diagnostic_variant_started_from_b_s_stages_ends_where_recomputing_them_does(setup, tmp_path, monkeypatch,
                                                                                       variant, override):
    """The benchmark starts each diagnostic variant of (b) from the (b) run's finished stages that it would
    recompute; the run must end exactly where the variant run from scratch does, and apart from (b)."""
    import benchmarks.clickprompt as bench

    monkeypatch.setattr(bench, "REPO", tmp_path)
    monkeypatch.setattr(bench, "run_name", lambda data, backbone, seed, v: f"{v}_s{seed}")
    bench_dir = tmp_path / "runs" / "bench"

    def run(out: Path, name: str, *overrides: str) -> dict:
        return build_trainer(_cfg(setup, out, name, "method.clickprompt.warmup=true", *overrides)).fit()

    b = run(bench_dir, "clickprompt_b_s1")
    scratch = run(tmp_path / "scratch", variant, override)
    bench.share_stages("d", "dcnv2", 1, variant)
    assert sorted(p.name for p in (bench_dir / f"{variant}_s1" / "stages").iterdir()) == sorted(
        bench.SHARED_STAGES[variant])
    shared = run(bench_dir, f"{variant}_s1", override)
    for key in ("valid_auc", "test_auc", "test_logloss"):
        assert shared[key] == scratch[key], key
    assert shared["test_logloss"] != b["test_logloss"]
    with pytest.raises(RuntimeError, match="have not finished"):
        bench.share_stages("d", "dcnv2", 2, variant)  # no (b) run for seed 2


def test_the_diagnosis_control_leaves_the_ctr_model_as_initialised_while_the_prompts_learn(setup, tmp_path,
                                                                                          monkeypatch):
    """``clickprompt_b_nothing_pretrained``: PA-MLM with the tables and the CTR model's dense layers at rate 0,
    fine-tuned from zeroed Adagrad state. Its CTR stage must start from the CTR model as initialised (so the
    variant is the base through (b)'s pipeline), while the prompt generator and the PLM do learn."""
    from benchmarks.clickprompt import variants

    seen = {}
    train_epoch = Trainer.train_epoch

    def spy(self, epoch, state):
        if self.stage.name not in seen:
            named = dict(self.task.named_parameters())
            seen[self.stage.name] = (embedding_weights(self.model).clone(),
                                     {k: p.detach().clone() for k, p in named.items() if not k.startswith("plm.")},
                                     {k: p.detach().clone() for k, p in named.items() if k.startswith("plm.")},
                                     sum(float(t.abs().sum()) for t in fbgemm_optimizer_state(self.model)))
        return train_epoch(self, epoch, state)

    monkeypatch.setattr(Trainer, "train_epoch", spy)
    args = SimpleNamespace(mlm_eval_steps=1, warmup_epochs=1, pretrain_epochs=1, warmup_steps=2, pretrain_steps=2,
                           mlm_batch=8, joint_steps=2, joint_epochs=1)
    control = variants(Path("unused"), args)["clickprompt_b_nothing_pretrained"]
    overrides = [o.format() for o in control if o.startswith("train.")]  # as benchmarks.quality fills them
    assert len(overrides) == 7  # the stages' epochs, steps, batch size and validation, then the three settings
    build_trainer(_cfg(setup, tmp_path, "control", "method.clickprompt.warmup=true", *overrides)).fit()
    (emb0, ctr0, plm0, _), (emb1, ctr1, plm1, sums) = seen["pretrain"], seen["ctr"]
    assert torch.equal(emb0, emb1) and all(torch.equal(ctr0[k], ctr1[k]) for k in ctr0) and sums == 0
    assert any(not torch.equal(plm0[k], plm1[k]) for k in plm0 if "generator" in k)
    assert any(not torch.equal(plm0[k], plm1[k]) for k in plm0 if "generator" not in k)
