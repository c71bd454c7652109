"""SRP4CTR and the DIN baseline: which fields make a sequence, masking, the encoder sees only the row's
history, the Q-Former's shape, pre-training through the one trainer, and what is refused."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from recsys.data.loader import ParquetBatches
from recsys.data.prepare import prepare
from recsys.data.schema import PreparedSchema, load_schema
from recsys.experiment import build_task, build_trainer, load_config
from recsys.methods.srp4ctr import choose_masks, sequence_fields
from recsys.modules.sequence import QFormer
from recsys.train.config import ConfigError


def _cfg(data: Path, out: Path, *overrides: str):
    return load_config(None, [f"data.path={data}", f"train.out_dir={out}", "name=s", "data.batch_size=16",
                              "data.eval_batch_size=32", "model.embedding_dim=8", "train.progress=false",
                              "train.epochs=2", "train.patience=5", "method.name=srp4ctr", *overrides])


def test_the_sequence_is_the_item_history_and_its_side_fields(tiny_prepared):
    _, data, _ = tiny_prepared
    f = sequence_fields(PreparedSchema.load(data))
    assert (f.item, f.item_history, f.item_side, f.behaviour) == ("item_id", "hist_item_id", ("hist_genre",),
                                                                  ("hist_rating",))


def test_each_masking_strategy_masks_only_its_fields_at_the_asked_ratio(tiny_prepared):
    _, data, _ = tiny_prepared
    f = sequence_fields(PreparedSchema.load(data))
    torch.manual_seed(0)
    mask = torch.rand(4000, 20) < 0.7
    masks = choose_masks(mask, f, ratio=0.2, item_side_share=0.25)
    item, genre, rating = masks["hist_item_id"], masks["hist_genre"], masks["hist_rating"]
    assert torch.equal(item, genre) and not (item & rating).any()  # a position is item-side or behaviour-side
    assert not ((item | rating) & ~mask).any()  # never padding
    assert abs((item | rating).sum() / mask.sum() - 0.2) < 0.01
    assert abs(item.sum() / (item | rating).sum() - 0.25) < 0.02


def test_the_encoding_depends_on_the_history_alone(tiny_prepared):
    """Two rows with the same history give the same encoding, whatever else differs (target, user, context):
    nothing of the row itself, or of anything later, reaches it; histories are strictly earlier by preparation."""
    _, data, _ = tiny_prepared
    schema = PreparedSchema.load(data)
    task = build_task(schema, _cfg(data, Path("/tmp")), device=torch.device("cpu")).eval()
    batch = next(iter(ParquetBatches(data, "train", schema, 16)))
    _, seqs, mask = task._sequences(batch)
    encoded = task.fgbert("encode", seqs, mask)
    kjt = batch.sparse_features.to_dict()
    other = {k: (v if k.startswith("hist_") else type(v)(values=torch.flip(v.values(), [0]), lengths=torch.flip(
        v.lengths(), [0]))) for k, v in kjt.items()}
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    changed = replace(batch, sparse_features=KeyedJaggedTensor.from_jt_dict(other))
    _, seqs2, mask2 = task._sequences(changed)
    assert torch.equal(mask, mask2) and torch.allclose(task.fgbert("encode", seqs2, mask2), encoded)
    assert not torch.equal(task.output(changed).logit, task.output(batch).logit)  # the rest did change


@pytest.mark.parametrize("k", [1, 3, 7])
def test_the_q_former_gives_k_vectors(k):
    out = QFormer(8, k)(torch.randn(5, 12, 8), torch.rand(5, 12) < 0.8)
    assert out.shape == (5, k, 8)
    empty = QFormer(8, k)(torch.randn(2, 12, 8), torch.zeros(2, 12, dtype=torch.bool))
    assert torch.equal(empty, torch.zeros(2, k, 8))  # a user with no history: zeros, no NaN


def test_pre_training_learns_and_hands_its_encoder_to_fine_tuning(tiny_prepared, tmp_path):
    _, data, _ = tiny_prepared
    # the tiny validation split has few history positions: mask half of them
    result = build_trainer(_cfg(data, tmp_path, "train.stage_epochs={pretrain: 4}", "method.srp4ctr.mask_ratio=0.5",
                                "data.batch_size=8")).fit()
    history = json.loads((tmp_path / "s" / "stages" / "pretrain" / "metrics.json").read_text())["history"]
    assert history[-1]["valid_loss"] < history[0]["valid_loss"]
    assert {"valid_item_hit10", "valid_hist_genre_accuracy", "valid_hist_rating_accuracy"} <= set(history[0])
    assert 0 <= result["test_auc"] <= 1


def test_what_cannot_run_is_refused(tiny, tiny_prepared, tmp_path):
    _, data, _ = tiny_prepared
    with pytest.raises(ConfigError, match="leave nothing for the encoder"):
        build_trainer(_cfg(data, tmp_path, "method.srp4ctr.cross=false", "method.srp4ctr.queries=0"))
    schema = load_schema(tiny.schema_path)
    untimed = replace(schema, source=replace(schema.source, timestamp_column=""))
    prepare(untimed, tmp_path / "untimed", progress=False)  # histories are skipped without timestamps
    with pytest.raises(ConfigError, match="SRP4CTR needs time-ordered behaviour sequences"):
        build_trainer(_cfg(tmp_path / "untimed", tmp_path, "name=u"))


# ---- cached history encodings: the served model ------------------------------------------------------------
@pytest.fixture(scope="module")
def srp_run(tiny_prepared, tmp_path_factory):
    """A finished tiny SRP4CTR run, its history cache over every split, and an export served from it."""
    from embedding_jobs import history_encodings
    from recsys.serve.artifact import export_run

    _, data, _ = tiny_prepared
    root = tmp_path_factory.mktemp("srp")
    result = build_trainer(_cfg(data, root, "train.stage_epochs={pretrain: 1}", "train.epochs=1")).fit()
    run = root / "s"
    assert not history_encodings.run(run, root / "cache", progress=False)["skipped"]
    export = export_run(run, root / "export", inputs={"history_cache": str(root / "cache")})
    return data, root, run, result, export


def test_cached_encodings_score_as_the_encoder_does(srp_run):
    """The export (backbone, cross-attention and Q-Former reading the cache; no encoder) scores every test row
    as the run's own model with its encoder does, and the test AUC the run reported."""
    from embedding_jobs.history_encodings import load_srp_run
    from recsys.serve.artifact import load_exported
    from recsys.serve.score import score_file

    data, root, run, result, export = srp_run
    task, schema, _ = load_srp_run(run)
    served = load_exported(export)
    assert served.task.fgbert is None and not any(k.startswith("fgbert.") for k in
                                                  torch.load(export / "model.pt", weights_only=True))
    with torch.no_grad():
        for batch in ParquetBatches(data, "test", schema, 16):
            assert torch.allclose(served.score(batch), task.score(batch), atol=1e-5)
    scored = score_file(served, data / "test.parquet", root / "scores.parquet", progress=False)
    assert scored["auc"] == pytest.approx(result["test_auc"], abs=1e-6)


def test_a_rerun_of_the_encoding_job_does_nothing(srp_run):
    from embedding_jobs import history_encodings

    _, root, run, _, _ = srp_run
    assert history_encodings.run(run, root / "cache", progress=False)["skipped"]


def test_a_cache_of_other_histories_another_encoder_or_dataset_is_refused(srp_run, tmp_path):
    from embedding_jobs import history_encodings
    from recsys.features.table import FeatureTableError
    from recsys.methods.srp4ctr_cache import HistoryCacheMiss, load_history_cache
    from recsys.serve.artifact import export_run, load_exported

    data, root, run, _, _ = srp_run
    history_encodings.run(run, tmp_path / "train_only", splits=("train",), progress=False)
    partial = export_run(run, tmp_path / "partial", inputs={"history_cache": str(tmp_path / "train_only")})
    schema = PreparedSchema.load(data)
    with pytest.raises(HistoryCacheMiss, match="does not hold"):
        for batch in ParquetBatches(data, "test", schema, 64):
            load_exported(partial).score(batch)
    # another encoder: a run of another seed
    build_trainer(_cfg(data, tmp_path, "name=o", "train.seed=7", "train.stage_epochs={pretrain: 1}",
                       "train.epochs=1")).fit()
    history_encodings.run(tmp_path / "o", tmp_path / "other", progress=False)
    with pytest.raises(FeatureTableError, match="made from another encoder"):
        export_run(run, tmp_path / "x", inputs={"history_cache": str(tmp_path / "other")})
    with pytest.raises(FeatureTableError, match="dataset_fingerprint"):
        f = sequence_fields(schema)
        load_history_cache(root / "cache", fingerprint="0" * 16, fields=f.all, length=f.length, dim=8)
    with pytest.raises(ConfigError, match="history-cache"):
        export_run(run, tmp_path / "y")


def test_one_pre_training_serves_another_backbone(srp_run, tmp_path):
    """``pretrained_run``: a DCNv2 run skips its own pre-training and starts from the DeepFM run's pre-trained
    encoder, which (frozen in fine-tuning) it keeps exactly."""
    from recsys.train.checkpoint import load_part

    data, _, run, _, _ = srp_run
    build_trainer(_cfg(data, tmp_path, "model.backbone=dcnv2", f"method.srp4ctr.pretrained_run={run}",
                       "train.epochs=1")).fit()
    assert not (tmp_path / "s" / "stages" / "pretrain").exists()  # no pre-training of its own
    schema = PreparedSchema.load(data)

    def encoder(checkpoint: Path) -> dict[str, torch.Tensor]:
        task = build_task(schema, _cfg(data, tmp_path), device=torch.device("cpu"))
        assert load_part(checkpoint, task, "fgbert.encoder.", "fgbert.encoder.") > 0
        return {k: v.clone() for k, v in task.state_dict().items() if k.startswith("fgbert.encoder.")}

    pretrained = encoder(run / "stages" / "pretrain" / "checkpoints" / "best")
    fine_tuned = encoder(tmp_path / "s" / "checkpoints" / "best")
    fresh = build_task(schema, _cfg(data, tmp_path, "train.seed=11"), device=torch.device("cpu")).state_dict()
    assert pretrained and pretrained.keys() == fine_tuned.keys()
    assert all(torch.equal(pretrained[k], fine_tuned[k]) for k in pretrained)
    assert not all(torch.equal(pretrained[k], fresh[k]) for k in pretrained)  # the comparison can fail
    with pytest.raises(ConfigError, match="no pre-training checkpoint"):
        build_trainer(_cfg(data, tmp_path, "name=x", f"method.srp4ctr.pretrained_run={tmp_path / 's'}"))
    with pytest.raises(ConfigError, match="contradicts"):
        build_trainer(_cfg(data, tmp_path, "name=y", f"method.srp4ctr.pretrained_run={run}",
                           "method.srp4ctr.pretrain=false"))
