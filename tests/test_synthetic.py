"""The synthetic click log (``recsys.data.synthetic``) and the planner's view of this machine's memory.

The generator must write a prepared dataset the loader reads like any other, the same bytes for the same
arguments, with vocabularies and training counts that agree with its rows and regime columns that say what
the training split holds. The planner must refuse a plan larger than this machine rather than pass it to a
job that would be killed later.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torchrec.distributed.planner.types import PlannerError
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recsys.data.loader import ParquetBatches
from recsys.data.schema import FIRST_ID, ITEM_TRAIN_ROWS, USER_TRAIN_ROWS, FieldKind, PreparedSchema
from recsys.data.synthetic import SyntheticSpec, generate, main, zipf_ids
from recsys.train.distributed import init_distributed, plan_and_shard, plan_tables

SPEC = SyntheticSpec(rows=6_000, features=5, dense=3, multi=1, max_values=4, min_vocab=20, max_vocab=3_000,
                     chunk_rows=1_000, seed=7)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, PreparedSchema]:
    out = tmp_path_factory.mktemp("syn") / "data"
    return out, generate(SPEC, out, progress=False)


def test_same_arguments_give_the_same_bytes(synthetic, tmp_path):
    out, _ = synthetic
    again = tmp_path / "again"
    generate(SPEC, again, progress=False)
    assert _digest(again) == _digest(out)
    other = tmp_path / "other"
    generate(SyntheticSpec(**{**SPEC.__dict__, "seed": 8}), other, progress=False)
    assert _digest(other)["train.parquet"] != _digest(out)["train.parquet"]


def test_loader_reads_every_split_and_ids_fit_the_tables(synthetic):
    out, schema = synthetic
    assert schema.counts == {"train": 4_800, "valid": 600, "test": 600}
    assert [f.vocab_size - FIRST_ID for f in schema.sparse_fields] == SPEC.vocab_sizes()
    assert schema.sparse_fields[-1].kind is FieldKind.MULTI_CATEGORICAL
    for split, n in schema.counts.items():
        rows = 0
        for batch in ParquetBatches(out, split, schema, batch_size=512):
            real = batch.weights > 0  # the last batch is padded with rows of weight 0
            for f in schema.sparse_fields:
                jt = batch.sparse_features[f.table]
                ids = jt.values()[real.repeat_interleave(jt.lengths())]
                assert ids.min() >= FIRST_ID and ids.max() < f.vocab_size, f.name
            assert torch.isfinite(batch.dense_features).all()
            rows += int(real.sum())
        assert rows == n, split


def test_vocab_train_rows_count_the_training_split(synthetic):
    out, schema = synthetic
    train = pq.read_table(out / "train.parquet")
    for f in schema.sparse_fields:
        vocab = pq.read_table(out / f.vocab_file)
        assert vocab["id"].to_pylist() == list(range(f.vocab_size))
        col = train[f.name].combine_chunks()
        ids = col.flatten().to_numpy() if f.kind is FieldKind.MULTI_CATEGORICAL else col.to_numpy()
        assert np.array_equal(vocab["train_rows"].to_numpy(), np.bincount(ids, minlength=f.vocab_size)), f.name


def test_regime_columns_say_what_training_holds(synthetic):
    out, schema = synthetic
    users = np.bincount(pq.read_table(out / "train.parquet")["C1"].to_numpy(), minlength=3_100)
    items = np.bincount(pq.read_table(out / "train.parquet")["C2"].to_numpy(), minlength=3_100)
    for split in ("valid", "test"):
        t = pq.read_table(out / f"{split}.parquet")
        assert np.array_equal(t[USER_TRAIN_ROWS].to_numpy(), users[t["C1"].to_numpy()])
        assert np.array_equal(t[ITEM_TRAIN_ROWS].to_numpy(), items[t["C2"].to_numpy()])
        assert schema.stats["regime_rows"][split]["cold_user"] == int((t[USER_TRAIN_ROWS].to_numpy() == 0).sum())
    assert 0 < schema.stats["regime_rows"]["test"]["cold_item"] < schema.counts["test"]
    test = pq.read_table(out / "test.parquet")
    p, y = test["p_true"].to_numpy(), test["label"].to_numpy()
    assert abs(p.mean() - y.mean()) < 0.05  # labels are drawn from the hidden probabilities


def test_zipf_ids_follow_the_power_law():
    ids = zipf_ids(np.random.default_rng(0), 200_000, 1_000, 1.05) - FIRST_ID
    counts = np.bincount(ids, minlength=1_000)
    assert ids.min() >= 0 and ids.max() < 1_000
    assert counts[0] > counts[1] > counts[9] > counts[99]  # most frequent first, as prepare orders vocabularies
    ratio = counts[0] / counts[9]  # (k + 1)^-s: 10^1.05 ~ 11, loosely, for the floored continuous law
    assert 6 < ratio < 20


@pytest.mark.parametrize("args, message", [
    (["--rows", "10"], "--rows"),
    (["--features", "4", "--multi", "3"], "--multi"),
    (["--min-vocab", "10", "--max-vocab", "5"], "--min-vocab"),
    (["--zipf", "1"], "--zipf"),
])
def test_bad_arguments_are_named(tmp_path, capsys, args, message):
    assert main(["--out", str(tmp_path / "x"), "--no-progress", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_refuses_to_replace_a_folder_that_is_not_a_dataset(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    assert main(["--out", str(tmp_path / "x"), "--rows", "200", "--no-progress"]) == 2
    assert "refusing" in capsys.readouterr().err
    assert (tmp_path / "x" / "notes.txt").read_text() == "mine"


def _meta_ebc(rows: int) -> EmbeddingBagCollection:
    return EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t_big", embedding_dim=16, num_embeddings=rows,
                                                             feature_names=["big"])], device=torch.device("meta"))


def test_planner_knows_this_machines_memory():
    """A table twice this machine's memory is refused when planned, naming the storage it needs; TorchRec's
    default topology (128 GB per rank) would have passed a plan above it on any smaller machine."""
    env = init_distributed()
    physical = __import__("os").sysconf("SC_PAGE_SIZE") * __import__("os").sysconf("SC_PHYS_PAGES")
    with pytest.raises(PlannerError, match="(?i)storage|memory"):
        plan_tables(_meta_ebc(2 * physical // 64), env, per_rank_batch=64, sharding_types=["table_wise"])
    _, plan = plan_and_shard(_meta_ebc(1_000), env, per_rank_batch=64, sharding_types=["table_wise"])
    assert plan.plan[""]["t_big"].sharding_type == "table_wise"


def test_help_names_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--rows", "--features", "--multi", "--table-size", "--zipf", "--seed", "--out"):
        assert option in text
