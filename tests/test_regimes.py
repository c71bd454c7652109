"""The measuring instrument: regime columns, cold-entity splits, the sparse regime, the embedding lookup of
rare and unseen ids, per-regime metrics and GAUC, paired comparisons, and cold users' texts."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from recsys.data.loader import ParquetBatches, embedding_lookup
from recsys.data.prepare import prepare
from recsys.data.schema import (
    ITEM_TRAIN_ROWS,
    UNK_ID,
    USER_KEY,
    USER_TRAIN_ROWS,
    PreparedSchema,
    load_schema,
)
from recsys.train.metrics import auc, gauc, regime_metrics

MODEL_INPUTS_AND_LABEL = ("label", "user_id", "gender", "age", "item_id", "genres", "device", "row_no",
                          "hist_item_id", "hist_rating", "hist_genre", "rating", "timestamp")


def _split_frames(folder: Path) -> dict:
    return {s: pq.read_table(folder / f"{s}.parquet").to_pandas() for s in ("train", "valid", "test")}


def test_regime_columns_count_each_rows_user_and_item_in_training(tiny_prepared):
    ds, out, _ = tiny_prepared
    raw = ds.interactions.set_index(ds.interactions["row_no"].astype(int))
    frames = _split_frames(out)
    train_rows = frames["train"]["row_no"].astype(int)
    users = raw.loc[train_rows, "user_id"].value_counts()
    items = raw.loc[train_rows, "item_id"].value_counts()
    for split, df in frames.items():
        rows = df["row_no"].astype(int)
        assert df[USER_TRAIN_ROWS].tolist() == [int(users.get(u, 0)) for u in raw.loc[rows, "user_id"]], split
        assert df[ITEM_TRAIN_ROWS].tolist() == [int(items.get(i, 0)) for i in raw.loc[rows, "item_id"]], split
        # one key per raw user, whatever the vocabulary does with it
        keys = dict(zip(raw.loc[rows, "user_id"], df[USER_KEY], strict=True))
        assert len(set(keys.values())) == len(keys)


def test_cold_item_split_holds_items_out_of_training(tiny, tmp_path):
    schema = load_schema(tiny.schema_path)
    schema = replace(schema, split=replace(schema.split, method="cold_item", holdout_fraction=0.25))
    out = tmp_path / "cold"
    prepared = prepare(schema, out, progress=False)
    frames = _split_frames(out)
    raw = tiny.interactions.set_index(tiny.interactions["row_no"].astype(int))
    items = {s: set(raw.loc[df["row_no"].astype(int), "item_id"]) for s, df in frames.items()}
    held = (items["valid"] | items["test"]) - items["train"]
    assert held, "some items are held out"
    assert not held & items["train"]
    for s in ("valid", "test"):  # every row of a held-out item is a cold-item row, and only those
        df = frames[s]
        is_held = raw.loc[df["row_no"].astype(int), "item_id"].isin(held).to_numpy()
        assert ((df[ITEM_TRAIN_ROWS] == 0).to_numpy() == is_held).all()
    assert prepared.split_method == "cold_item (time)"
    # the held-out rows go half to valid, half to test
    n_valid = sum(raw.loc[frames["valid"]["row_no"].astype(int), "item_id"].isin(held))
    n_test = sum(raw.loc[frames["test"]["row_no"].astype(int), "item_id"].isin(held))
    assert abs(n_valid - n_test) <= 1


def test_train_fraction_is_seeded_and_keeps_valid_and_test(tiny, tmp_path):
    schema = load_schema(tiny.schema_path)
    full = prepare(schema, tmp_path / "full", progress=False)
    sparse = [prepare(replace(schema, split=replace(schema.split, train_fraction=0.5, seed=s)), tmp_path / f"s{i}",
                      progress=False) for i, s in enumerate((7, 7, 8))]
    frames = [_split_frames(tmp_path / p) for p in ("full", "s0", "s1", "s2")]
    assert frames[1]["train"].equals(frames[2]["train"])  # seeded
    assert not frames[1]["train"].equals(frames[3]["train"])
    assert len(frames[1]["train"]) == round(full.counts["train"] * 0.5) == sparse[0].counts["train"]
    assert set(frames[1]["train"]["row_no"]) < set(frames[0]["train"]["row_no"])
    # time order kept: the subsample is a subsequence of the full training split
    assert frames[1]["train"]["timestamp"].is_monotonic_increasing
    for split in ("valid", "test"):  # the same rows and ids: only the regime counts follow the subsample
        a = pq.read_table(tmp_path / "full" / f"{split}.parquet", columns=list(MODEL_INPUTS_AND_LABEL))
        b = pq.read_table(tmp_path / "s0" / f"{split}.parquet", columns=list(MODEL_INPUTS_AND_LABEL))
        assert a.equals(b), split
        assert (frames[1][split][USER_TRAIN_ROWS] <= frames[0][split][USER_TRAIN_ROWS]).all()
    for name in ("user_id", "item_id", "genres"):  # vocabularies too (built from the whole training split)
        a = pq.read_table(tmp_path / "full" / "vocab" / f"{name}.parquet", columns=["id", "value"])
        b = pq.read_table(tmp_path / "s0" / "vocab" / f"{name}.parquet", columns=["id", "value"])
        assert a.equals(b), name


def test_rare_and_unseen_ids_read_the_unknown_row(tiny_prepared):
    _, out, prepared = tiny_prepared
    schema = PreparedSchema.load(out)
    train = pq.read_table(out / "train.parquet").to_pandas()
    for min_count in (1, 2, 3):
        lookup = embedding_lookup(out, schema, min_count)
        vocab = pq.read_table(out / "vocab" / "item_id.parquet").to_pandas()
        # train_rows counts every occurrence in training: as a target and in histories (one shared table)
        occurrences = train["item_id"].value_counts().add(
            train["hist_item_id"].explode().dropna().astype(int).value_counts(), fill_value=0)
        for i, n in zip(vocab["id"], vocab["train_rows"], strict=True):
            assert n == int(occurrences.get(i, 0)), i
            expected = i if i == 0 or (i >= 2 and n >= min_count) else UNK_ID
            assert lookup["item_id"][i] == expected
    lookup = embedding_lookup(out, schema, 2)
    batch = next(iter(ParquetBatches(out, "valid", schema, 64, lookup=lookup, extra_columns=("user_id",))))
    stored = pq.read_table(out / "valid.parquet", columns=["user_id"]).column("user_id").to_numpy()
    n = len(stored)
    assert batch.sparse_features["user_id"].values()[:n].tolist() == lookup["user_id"][stored].tolist()
    assert batch.extras["user_id"][:n].tolist() == stored.tolist()  # the stored id, for feature tables


def test_the_unknown_row_is_trained_and_an_export_bakes_it_in(tiny_prepared, tmp_path):
    from recsys.experiment import build_trainer, load_config
    from recsys.serve.artifact import export_run, load_exported

    _, out, _ = tiny_prepared
    cfg = load_config(None, [f"data.path={out}", f"train.out_dir={tmp_path}", "name=r", "data.batch_size=16",
                             "data.eval_batch_size=32", "model.embedding_dim=8", "train.progress=false",
                             "train.epochs=1", "train.pipeline=false", "model.backbone=dcnv2",
                             "data.min_count=11"])  # i2 (10 training occurrences) and i9 (none) read <unk>
    trainer = build_trainer(cfg)

    def item_rows() -> torch.Tensor:
        weights = trainer.model.state_dict()
        key = next(k for k in weights if k.endswith("embedding_bags.t_item_id.weight"))
        return torch.cat([s.tensor for s in weights[key].local_shards()], dim=1).clone()

    before = item_rows()
    trainer.fit()
    after = item_rows()
    lookup = trainer.lookup["item_id"]
    cold = [i for i in range(2, len(lookup)) if lookup[i] == UNK_ID]
    assert len(cold) == 2
    assert not torch.equal(before[UNK_ID], after[UNK_ID])  # trained, on the rare item's rows
    assert all(torch.equal(before[i], after[i]) for i in cold)  # their own rows are never read
    exported = load_exported(export_run(tmp_path / "r", tmp_path / "export"))
    rows = exported.model.sparse_arch.ebc.embedding_bags["t_item_id"].weight
    assert all(torch.equal(rows[i], rows[UNK_ID]) for i in cold)
    assert json.loads((tmp_path / "export" / "export.json").read_text())["min_count"] == 11


def test_gauc_matches_a_hand_computation():
    probs = torch.tensor([0.9, 0.2, 0.6, 0.4, 0.8, 0.7, 0.3, 0.5])
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    users = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])  # user 1 has one class: skipped
    # user 0: positives 0.9, 0.4 against negatives 0.2, 0.6 -> 3 of 4 pairs; user 2: 0.5 > 0.3 -> 1
    value, used = gauc(probs, labels, users)
    assert used == 2 and value == pytest.approx((0.75 * 4 + 1.0 * 2) / 6)


def test_regimes_with_no_rows_or_one_class_are_reported_as_such():
    probs = torch.tensor([0.9, 0.2, 0.6, 0.4])
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0])
    user_rows = torch.tensor([3, 3, 0, 0])
    item_rows = torch.tensor([10, 2, 10, 10])
    out = regime_metrics(probs, labels, user_rows, item_rows, torch.tensor([0, 0, 1, 1]))["regimes"]
    assert out["all"]["auc"] == auc(probs, labels) and out["all"]["rows"] == 4
    assert out["cold_user"] == {"rows": 2, "auc": None, "logloss": pytest.approx(out["cold_user"]["logloss"]),
                                "positives": 2, "note": "one class"}
    assert out["cold_item"] == {"rows": 0, "auc": None, "logloss": None, "note": "no rows"}
    assert out["long_tail"]["rows"] == 1 and out["warm"]["rows"] == 2 and out["warm"]["auc"] == 1.0


def test_a_run_reports_its_regimes_and_stops_on_overall_auc(tiny_prepared, tmp_path):
    from recsys.experiment import build_trainer, load_config

    _, out, _ = tiny_prepared
    cfg = load_config(None, [f"data.path={out}", f"train.out_dir={tmp_path}", "name=r", "data.batch_size=16",
                             "data.eval_batch_size=32", "model.embedding_dim=8", "train.progress=false",
                             "train.epochs=2"])
    result = build_trainer(cfg).fit()
    saved = json.loads((tmp_path / "r" / "test_metrics.json").read_text())
    assert set(saved["test_regimes"]) == {"all", "warm", "cold_user", "cold_item", "long_tail"}
    assert saved["test_regimes"]["all"]["rows"] == saved["test_rows"] == result["test_rows"]
    assert saved["test_regimes"]["all"]["auc"] == saved["test_auc"]
    history = json.loads((tmp_path / "r" / "metrics.json").read_text())
    best = max(history["history"], key=lambda h: h["valid_auc"])
    assert history["best_epoch"] == best["epoch"] and "valid_gauc" in best


def test_paired_t_test_gives_the_known_statistic():
    from benchmarks.stats import paired, t_quantile

    r = paired([0.80, 0.81, 0.79, 0.80, 0.82], [0.81, 0.83, 0.80, 0.81, 0.83])
    # differences .01 .02 .01 .01 .01: mean .012, sd .004472, t = .012 / (.004472 / sqrt 5) = 6.0, df 4
    assert r.t == pytest.approx(6.0) and r.p == pytest.approx(0.00388, abs=2e-5) and r.verdict == "better"
    assert t_quantile(0.975, 4) == pytest.approx(2.776445, abs=1e-5)
    assert r.low == pytest.approx(0.012 - 2.776445 * 0.004472136 / 5 ** 0.5, abs=1e-6)
    noisy = paired([0.80, 0.81, 0.79], [0.81, 0.80, 0.80])
    assert noisy.verdict == "within noise" and noisy.low < 0 < noisy.high


def test_cold_users_text_has_its_profile_and_no_rating(tiny_prepared):
    from embedding_jobs.prepared import PreparedData
    from embedding_jobs.templates import TemplateOptions, user_texts

    _, out, _ = tiny_prepared
    data = PreparedData.open(out)
    texts = user_texts(data, TemplateOptions().resolve(data))
    by_key = dict(zip(texts.keys.tolist(), texts.texts, strict=True))
    frames = _split_frames(out)
    cold = set(frames["valid"]["user_id"][frames["valid"][USER_TRAIN_ROWS] == 0]) | set(
        frames["test"]["user_id"][frames["test"][USER_TRAIN_ROWS] == 0])
    gender = data.vocab_text(data.field("gender"))
    for user in cold:
        row = frames["valid"][frames["valid"]["user_id"] == user]
        row = row if len(row) else frames["test"][frames["test"]["user_id"] == user]
        text = by_key[int(user)]
        assert f"gender is {gender[int(row['gender'].iloc[0])]}" in text, text
        assert "rated" not in text and "Recently" not in text, text
    warm = frames["train"]["user_id"].iloc[0]
    assert re.search(r"Recently rated, most recent first: ", by_key[int(warm)])


def test_ml100k_time_split_is_mostly_cold_users(tmp_path):
    prepared = prepare(load_schema("ml-100k"), tmp_path / "ml-100k", progress=False)
    for split in ("valid", "test"):
        cold = prepared.stats["regime_rows"][split]["cold_user"] / prepared.counts[split]
        assert 0.8 < cold < 0.9, cold  # ~86%: the time split's later rows are mostly new users


def test_runs_of_two_records_are_paired_only_when_their_base_runs_agree(tmp_path, monkeypatch):
    import benchmarks.compare as compare

    monkeypatch.setattr(compare, "RESULTS", tmp_path)

    def record(name: str, base: list[float], variant: str) -> None:
        runs = {"base": {"test_auc": base}, variant: {"test_auc": [0.7, 0.71, 0.72] if variant == "new" else
                                                      [0.72, 0.73, 0.735]}}
        (tmp_path / f"{name}.json").write_text(json.dumps({"seeds": [1, 2, 3], "command": name,
                                                           "runs": {"deepfm": runs}}))

    record("a", [0.80, 0.81, 0.82], "new")
    record("b", [0.80, 0.81, 0.82], "old")
    argv = ["--data", "d", "--record", "a", "--variants", "new", "--reference", "old", "--reference-record", "b",
            "--out", "pair"]
    assert compare.main(argv) == 0
    assert json.loads((tmp_path / "pair.json").read_text())["table"]["deepfm"]["new"]["all"]["mean"] == \
        pytest.approx(-0.055 / 3)
    record("b", [0.80, 0.8105, 0.82], "old")  # another base model: seed 2 differs
    with pytest.raises(SystemExit, match="seed 2"):
        compare.main(argv)


def test_a_record_s_variants_are_paired_with_the_base_runs_trained_beside_them(tmp_path, monkeypatch):
    import benchmarks.compare as compare

    monkeypatch.setattr(compare, "RESULTS", tmp_path)
    # the quality record's base is another run of the model (another commit): pairing with it would shift every cell
    (tmp_path / "quality_d.json").write_text(json.dumps({"seeds": [1, 2, 3], "command": "quality",
                                                         "backbones": {"deepfm": {"test_auc": [0.9, 0.9, 0.9]}}}))
    runs = {"deepfm": {"base": {"test_auc": [0.80, 0.81, 0.82]}, "new": {"test_auc": [0.81, 0.82, 0.83]}}}
    (tmp_path / "r.json").write_text(json.dumps({"seeds": [1, 2, 3], "command": "r", "runs": runs}))
    assert compare.main(["--data", "d", "--record", "r", "--variants", "new", "--out", "o"]) == 0
    assert json.loads((tmp_path / "o.json").read_text())["table"]["deepfm"]["new"]["all"]["mean"] == \
        pytest.approx(0.01)
    # a record without base runs is paired with the quality record's
    del runs["deepfm"]["base"]
    (tmp_path / "r.json").write_text(json.dumps({"seeds": [1, 2, 3], "command": "r", "runs": runs}))
    assert compare.main(["--data", "d", "--record", "r", "--variants", "new", "--out", "o"]) == 0
    assert json.loads((tmp_path / "o.json").read_text())["table"]["deepfm"]["new"]["all"]["mean"] == \
        pytest.approx(-0.08)
