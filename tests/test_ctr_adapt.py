"""ELEC stage 1: the language model adapted on click labels, saved with LoRA merged, and embedded by the job.

A tiny random BERT (no hub) learns a toy dataset whose label is decided by the item; the embedding job then
stores T(meanpool(H)), which the tests recompute by hand from the saved files. Stage A (the head warm start on
the frozen encoder's cached vectors) and --tune head are tested on the same toy data.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny

from embedding_jobs.ctr_adapt import AdaptOptions, ElecModel, adapt
from embedding_jobs.ctr_adapt import main as adapt_main
from embedding_jobs.elec_head import ELEC_TRANSFORM, HEAD_CONFIG, HEAD_WEIGHTS, HeadConfig, load_head
from embedding_jobs.prepared import PreparedData
from embedding_jobs.run import main as embed_main
from embedding_jobs.templates import TemplateOptions, item_texts, user_texts
from embedding_jobs.tiny_models import save_tiny_encoder
from recsys.features import FeatureEntity, FeatureTableMetadata, load_feature_table

CLICKED_ITEMS = {"i1", "i2", "i3", "i4"}  # every rating of these is 5 (a click), of the others 1
REP_DIM = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> None:
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine OpenMP's spinning threads
    make them twenty times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny dataset with 200 interactions whose label depends only on the item: learnable from item text."""
    from recsys.data.prepare import prepare
    from recsys.data.schema import load_schema

    root = tmp_path_factory.mktemp("elec-toy")
    ds = make_tiny(root / "raw", n=200)
    ds.interactions["rating"] = ["5" if i in CLICKED_ITEMS else "1" for i in ds.interactions.item_id]
    ds.write()
    prepare(load_schema(ds.schema_path), root / "prepared", progress=False)
    return root / "prepared"


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BERT, hidden 128 in heads of 64 (what vLLM's CPU attention accepts)."""
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"), hidden=128, heads=2)


@pytest.fixture(scope="module")
def adapted(toy: Path, encoder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """LoRA without the head warm start (--head-epochs 0), so that stage B has to learn the labels itself."""
    out = tmp_path_factory.mktemp("adapted") / "elec"
    opts = AdaptOptions(dataset=toy, out=out, model=encoder, epochs=8, batch_size=16, head_lr=3e-3, time_budget_s=None,
                        hidden_dim=32, rep_dim=REP_DIM, max_length=48, head_epochs=0)
    return out, adapt(opts, progress=False)


HEAD_ONLY_ARGS = ["--head-epochs", "60", "--head-batch-size", "16", "--head-lr", "3e-3", "--hidden-dim", "32",
                  "--rep-dim", str(REP_DIM), "--max-length", "48", "--no-progress"]


@pytest.fixture(scope="module")
def head_only(toy: Path, encoder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """--tune head from the command line: stage A only, the encoder stays the base model."""
    out = tmp_path_factory.mktemp("head-only") / "elec"
    assert adapt_main(["--dataset", str(toy), "--model", str(encoder), "--out", str(out), "--tune", "head",
                       *HEAD_ONLY_ARGS]) == 0
    return out, json.loads((out / "report.json").read_text())


def _mean_pool(folder: Path, texts: list[str], max_length: int) -> torch.Tensor:
    """meanpool(H) by hand, with plain transformers on the saved folder."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    return (hidden * m).sum(1) / m.sum(1)


def _transform_by_hand(folder: Path, pooled: torch.Tensor) -> torch.Tensor:
    """T from the formula in elec_head.json: W2 @ gelu(W1 @ z + b1) + b2, weights read from safetensors."""
    from safetensors.torch import load_file

    w = load_file(str(folder / HEAD_WEIGHTS))
    hidden = F.gelu(pooled @ w["transform.0.weight"].T + w["transform.0.bias"])
    return hidden @ w["transform.2.weight"].T + w["transform.2.bias"]


# --- (a) adaptation ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_adaptation_learns_the_toy_labels_and_writes_the_model_folder(adapted: tuple[Path, dict]) -> None:
    out, report = adapted
    for name in ("config.json", "model.safetensors", "tokenizer.json", HEAD_CONFIG, HEAD_WEIGHTS, "report.json"):
        assert (out / name).is_file(), name
    assert list(out.glob("*.safetensors")) == [out / "model.safetensors"]  # vLLM loads every top-level one
    assert not list(out.parent.glob(".elec.*"))  # the temporary folder was renamed, nothing left behind
    assert json.loads((out / "report.json").read_text())["valid_auc_after"] == report["valid_auc_after"]
    config = HeadConfig(**json.loads((out / HEAD_CONFIG).read_text()))
    assert (config.input_dim, config.hidden_dim, config.rep_dim, config.max_length) == (128, 32, REP_DIM, 48)
    assert config.template_options["history_item_field"] == "item_id"  # resolved, so the job can reuse it
    losses = np.array(report["train_loss"])
    steps = len(losses) // 8
    assert report["steps"] == len(losses) == 8 * steps and not report["stopped_by_time_budget"]
    assert losses[-steps:].mean() < losses[:steps].mean() - 0.1, losses
    assert report["valid_auc_after"] > max(report["valid_auc_before"], 0.9)
    assert report["dataset"] == "tiny" and len(report["base_weights_hash"]) == 64
    assert report["head_steps"] == 0 and report["valid_auc_head"] == report["valid_auc_before"]  # no warm start
    assert report["rows_used"] == report["train_rows"] and report["options"]["tune"] == "lora"


def test_report_keeps_the_keys_the_benchmark_reads(head_only: tuple[Path, dict]) -> None:
    _, report = head_only
    for key in ("valid_auc_before", "valid_auc_head", "valid_auc_after", "rows_used", "steps", "seconds", "options",
                "head_texts_encoded", "head_encode_seconds", "head_train_seconds"):
        assert key in report, key
    assert report["seconds"] >= report["head_encode_seconds"] + report["head_train_seconds"]


def test_head_only_learns_the_toy_labels_on_the_frozen_encoder(head_only: tuple[Path, dict], toy: Path) -> None:
    out, report = head_only
    assert report["tune"] == "head" and report["options"]["tune"] == "head" and report["encoder_lr"] is None
    assert report["valid_auc_head"] > max(report["valid_auc_before"], 0.9)
    assert report["valid_auc_after"] == report["valid_auc_head"]  # no stage B: the head's AUC is the final one
    assert report["steps"] == report["rows_trained"] == 0 and not report["stopped_by_time_budget"]
    assert report["head_epochs"] == 60 and report["rows_used"] == report["head_rows"] == report["train_rows"]
    losses = [h["train_loss"] for h in report["head_history"]]
    assert len(losses) == 60 and losses[-1] < losses[0] - 0.2, losses
    # stage A encodes the distinct users and items of the sampled rows only, each once
    data = PreparedData.open(toy)
    rows = {s: data.read_split(s, ["user_id", "item_id"]) for s in ("train", "valid")}
    n_users, n_items = (len(set().union(*(rows[s].column(c).to_pylist() for s in rows))) for c in ("user_id", "item_id"))
    assert (report["head_users_encoded"], report["head_items_encoded"]) == (n_users, n_items)
    assert report["head_texts_encoded"] == n_users + n_items
    for name in ("config.json", "model.safetensors", "tokenizer.json", HEAD_CONFIG, HEAD_WEIGHTS):
        assert (out / name).is_file(), name


@pytest.mark.slow
def test_head_only_folder_stores_t_of_the_base_models_vectors(head_only: tuple[Path, dict], toy: Path,
                                                              encoder: Path, tmp_path: Path) -> None:
    folder, _ = head_only
    assert embed_main(["--entity", "user", "item", "--dataset", str(toy), "--out", str(tmp_path), "--model",
                       str(folder), "--engine", "transformers", "--batch-size", "4", "--no-progress"]) == 0
    data = PreparedData.open(toy)
    templates = TemplateOptions(history_outcomes=False).resolve(data)
    for entity, texts in (("user", user_texts(data, templates)), ("item", item_texts(data, templates))):
        table = load_feature_table(tmp_path / entity, expect_fingerprint=data.schema.fingerprint, expect_entity=entity)
        assert (table.metadata.head, table.metadata.dim) == (ELEC_TRANSFORM, REP_DIM)
        expected = _transform_by_hand(folder, _mean_pool(encoder, texts.texts, 48))  # the base model's meanpool
        torch.testing.assert_close(table.embeddings[texts.keys], expected, atol=1e-5, rtol=1e-4)


def test_stage_a_warm_starts_the_head_before_lora(toy: Path, encoder: Path, tmp_path: Path) -> None:
    """Stage A runs first and is not limited by the time budget: the one LoRA step the budget allows starts from
    a head that already separates the labels."""
    report = adapt(AdaptOptions(dataset=toy, out=tmp_path / "m", model=encoder, epochs=5, batch_size=16,
                                time_budget_s=1e-9, head_epochs=60, head_batch_size=16, head_lr=3e-3, hidden_dim=32,
                                rep_dim=REP_DIM, max_length=32), progress=False)
    assert report["tune"] == "lora" and report["encoder_lr"] == 5e-4
    assert report["valid_auc_head"] > max(report["valid_auc_before"], 0.9)
    assert report["stopped_by_time_budget"] and report["steps"] == 1 and report["rows_trained"] == 16
    assert report["train_loss"][0] < 0.5 < report["head_history"][0]["train_loss"]  # BCE of an untrained head: ~0.69
    assert report["valid_auc_after"] > 0.8
    assert report["head_texts_encoded"] > 0 and report["seconds"] > report["train_seconds"]


def test_stage_b_keeps_the_best_evaluated_step_and_can_freeze_the_head(toy: Path, encoder: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """--eval-every: the saved model is the best of stage A, the evaluated steps and the end, and its final
    validation AUC is that best one's; --stage-b-head-lr 0: stage B leaves the stage A head as it was."""
    from safetensors.torch import load_file

    from embedding_jobs import ctr_adapt

    stage_a_heads = []

    def warm_start_head(model, *args, **kwargs):  # the real stage A, its head kept for the comparison
        result = original(model, *args, **kwargs)
        stage_a_heads.append({f"{k}": v.clone() for k, v in model.head.state_dict().items()})
        return result

    original = ctr_adapt.warm_start_head
    monkeypatch.setattr(ctr_adapt, "warm_start_head", warm_start_head)
    opts = dict(dataset=toy, model=encoder, epochs=2, batch_size=16, time_budget_s=None, head_epochs=3,
                head_batch_size=16, head_lr=3e-3, hidden_dim=32, rep_dim=REP_DIM, max_length=32, eval_every=3)
    report = adapt(AdaptOptions(out=tmp_path / "m", stage_b_head_lr=0.0, **opts), progress=False)
    evaluations = report["stage_b_evaluations"]
    assert evaluations and [e["step"] for e in evaluations] == list(range(3, report["steps"] + 1, 3))
    best = max([report["valid_auc_head"]] + [e["valid_auc"] for e in evaluations])
    assert report["valid_auc_after"] >= best - 1e-9  # never worse than a state it measured
    assert report["stage_b_head_lr"] == 0.0
    saved = load_file(str(tmp_path / "m" / HEAD_WEIGHTS))
    assert saved.keys() == stage_a_heads[0].keys()
    assert all(torch.equal(saved[k], stage_a_heads[0][k]) for k in saved)
    with pytest.raises(ValueError, match="eval_every"):
        adapt(AdaptOptions(out=tmp_path / "x", **{**opts, "eval_every": -1}), progress=False)


@pytest.mark.slow
def test_time_budget_stops_after_the_current_step(toy: Path, encoder: Path, tmp_path: Path) -> None:
    report = adapt(AdaptOptions(dataset=toy, out=tmp_path / "m", model=encoder, epochs=50, batch_size=8,
                                time_budget_s=1e-9, max_length=32, rep_dim=8, hidden_dim=8), progress=False)
    assert report["stopped_by_time_budget"] and report["steps"] == 1 and report["rows_trained"] == 8


# --- (b) LoRA merge ------------------------------------------------------------------------------------------


def test_saved_model_gives_the_vectors_of_the_in_memory_lora_model(encoder: Path, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = ElecModel(encoder, AdaptOptions(Path(), Path(), encoder, lora_rank=4, hidden_dim=16, rep_dim=8,
                                            max_length=24))
    with torch.no_grad():  # LoRA's B starts at zero: make the adapters matter before merging
        for name, p in model.encoder.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.train(False)
    texts = ["The item is i1. The genres is Action, Comedy.", "short", "a longer text " * 10]
    with torch.no_grad():
        pooled, reps = model.pooled(texts), model.represent(texts)
        base = ElecModel(encoder, AdaptOptions(Path(), Path(), encoder, tune="full", max_length=24)).pooled(texts)
    assert (pooled - base).abs().max() > 1e-2  # the adapters change the vectors
    config = HeadConfig(input_dim=128, hidden_dim=16, rep_dim=8, max_length=24)
    model.save(tmp_path, config)
    saved = _mean_pool(tmp_path, texts, 24)
    torch.testing.assert_close(saved, pooled, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(load_head(tmp_path).transform(saved), reps, atol=1e-5, rtol=1e-4)


# --- (c) the embedding job stores T(meanpool(H)) -----------------------------------------------------------


@pytest.mark.slow
def test_embedding_job_stores_the_transformed_representation(adapted: tuple[Path, dict], toy: Path,
                                                             tmp_path: Path) -> None:
    folder, _ = adapted
    args = ["--dataset", str(toy), "--out", str(tmp_path / "tables"), "--model", str(folder), "--engine",
            "transformers", "--batch-size", "4", "--no-progress"]
    assert embed_main(["--entity", "user", "item", *args]) == 0
    data = PreparedData.open(toy)
    templates = TemplateOptions(history_outcomes=False).resolve(data)
    for entity, texts in (("user", user_texts(data, templates)), ("item", item_texts(data, templates))):
        table = load_feature_table(tmp_path / "tables" / entity, expect_fingerprint=data.schema.fingerprint,
                                   expect_entity=entity)
        meta = table.metadata
        assert (meta.head, meta.dim, meta.pooling, meta.normalize, meta.max_length) == (
            ELEC_TRANSFORM, REP_DIM, "mean", False, 48)
        expected = _transform_by_hand(folder, _mean_pool(folder, texts.texts, 48))
        torch.testing.assert_close(table.embeddings[texts.keys], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_embedding_job_refuses_settings_that_would_store_other_vectors(adapted: tuple[Path, dict], toy: Path,
                                                                      tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    folder, _ = adapted
    args = ["--dataset", str(toy), "--out", str(tmp_path), "--model", str(folder), "--engine", "transformers"]
    assert embed_main(["--entity", "field", *args]) == 2
    assert "embeds users and items, not field" in caplog.text
    assert embed_main(["--entity", "item", "--normalize", *args]) == 2
    assert embed_main(["--entity", "item", "--pooling", "cls", *args]) == 2
    assert caplog.text.count("pooling must be mean and normalize off") == 2


def test_tables_written_before_the_head_field_still_read() -> None:
    meta = FeatureTableMetadata(
        entity=FeatureEntity.ITEM, table="item_id", num_rows=6, dim=8, model_name="m", weights_hash="0" * 64,
        engine="transformers", pooling="mean", normalize=True, max_length=32, dtype="float32", template_version=1,
        template_hash="1" * 64, dataset_name="tiny", dataset_fingerprint="f" * 16, created_at="2026-01-01")
    old = {k: v for k, v in asdict(meta).items() if k != "head"}
    assert FeatureTableMetadata.from_json(json.dumps(old), "old") == meta and meta.head == ""
    assert meta.differences(FeatureTableMetadata(**{**asdict(meta), "head": ELEC_TRANSFORM})) == ["head"]


# --- (d) the command line -------------------------------------------------------------------------------------


def test_cli_help(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        adapt_main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "ELEC stage 1" in out and "T(meanpool(H))" in out
    for option in ("--rows", "--valid-rows", "--time-budget-s", "--full", "--lora-rank", "--trust-remote-code",
                   "--tune {lora,full,head}", "--head-epochs", "--head-batch-size", "--head-lr"):
        assert option in out
    assert "stage B only" in out


def test_full_is_an_alias_of_tune_full(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[AdaptOptions] = []

    def fake_adapt(opts: AdaptOptions, progress: bool) -> dict:
        seen.append(opts)
        raise ValueError("options seen")

    monkeypatch.setattr("embedding_jobs.ctr_adapt.adapt", fake_adapt)
    common = ["--dataset", str(tmp_path), "--out", str(tmp_path / "o"), "--model", str(tmp_path)]
    for extra, tune in (([], "lora"), (["--full"], "full"), (["--tune", "head"], "head"), (["--tune", "full"], "full")):
        assert adapt_main([*common, *extra]) == 2
        assert seen[-1].tune == tune
    assert seen[1].lora is False and seen[1].trains_encoder and not seen[2].trains_encoder
    assert seen[1].encoder_lr == 1e-4 and seen[2].encoder_lr is None


def test_the_benchmarks_adaptation_settings_are_the_options_they_name(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    """benchmarks.adapt_options passes its settings to this CLI after 10 minutes of other work: a renamed or
    misspelt flag must fail here, not there."""
    from benchmarks.adapt_options import SETTINGS

    seen: dict[str, AdaptOptions] = {}

    def fake_adapt(opts: AdaptOptions, progress: bool) -> dict:
        seen[name] = opts
        raise ValueError("options seen")

    monkeypatch.setattr("embedding_jobs.ctr_adapt.adapt", fake_adapt)
    for name, flags in SETTINGS.items():
        assert adapt_main(["--dataset", str(tmp_path), "--out", str(tmp_path / name), "--model", str(tmp_path),
                           *flags]) == 2
    assert seen["records"].stage_b_head_lr is None and seen["records"].eval_every == 0  # what every record used
    assert seen["frozen_head"].stage_b_head_lr == 0 and seen["frozen_head"].eval_every > 0


def test_bad_arguments_give_clear_errors(toy: Path, encoder: Path, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    common = ["--out", str(tmp_path / "out"), "--no-progress"]
    assert adapt_main(["--dataset", str(tmp_path / "nowhere"), "--model", str(encoder), *common]) == 2
    assert re.search(r"nowhere/schema.json not found: is .* a prepared dataset", caplog.text)
    assert adapt_main(["--dataset", str(toy), "--model", str(tmp_path / "no-model"), *common]) == 2
    assert re.search(r"model folder .*no-model does not exist", caplog.text)

    no_users = tmp_path / "no-users"
    shutil.copytree(toy, no_users)
    schema = json.loads((no_users / "schema.json").read_text())
    schema["fields"] = [f for f in schema["fields"] if f["name"] != "user_id"]
    (no_users / "schema.json").write_text(json.dumps(schema))
    assert adapt_main(["--dataset", str(no_users), "--model", str(encoder), *common]) == 2
    assert "needs a user key field ('user_id') and an item key field ('item_id')" in caplog.text

    (tmp_path / "out").mkdir()
    assert adapt_main(["--dataset", str(toy), "--model", str(encoder), *common]) == 2
    assert "exists: pass another --out, or --overwrite" in caplog.text
    assert adapt_main(["--dataset", str(toy), "--model", str(encoder), "--rows", "0", *common, "--overwrite"]) == 2
    assert "rows must be >= 1" in caplog.text
    assert adapt_main(["--dataset", str(toy), "--model", str(encoder), "--head-epochs", "-1", *common,
                       "--overwrite"]) == 2
    assert "head_epochs must be >= 0" in caplog.text


# --- vLLM (slow: starts vLLM once) ---------------------------------------------------------------------------


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_engine_stores_the_same_vectors(adapted: tuple[Path, dict], toy: Path) -> None:
    pytest.importorskip("vllm")
    from embedding_jobs.engines import EngineOptions, TransformersEngine, VLLMEngine, VLLMOptions

    folder, _ = adapted
    data = PreparedData.open(toy)
    texts = item_texts(data, TemplateOptions(history_outcomes=False).resolve(data)).texts
    expected = TransformersEngine(EngineOptions(model=folder)).embed(texts)
    engine = VLLMEngine(EngineOptions(model=folder), VLLMOptions(gpu_memory_utilization=0.1))
    try:
        got = engine.embed(texts)
    finally:
        engine.close()
    assert engine.info.head == ELEC_TRANSFORM and got.shape == (len(texts), REP_DIM)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)
