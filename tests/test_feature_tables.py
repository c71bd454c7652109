"""Feature tables (DESIGN.md contract 2): the format, the reader's refusals, crash-safe parts and sharding.

No language model here: a fake engine (vectors from a hash of the text) fills the engine slot, so these
tests take seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fake_engine import DIM, FAKE_MODEL, FakeEngine, run_fake

from embedding_jobs.jobs import JobOptions, run_job
from embedding_jobs.table_writer import TableFolder, TablePlan, write_table_file
from recsys.features import (
    METADATA_KEY,
    FeatureEntity,
    FeatureTableError,
    FeatureTableMetadata,
    load_feature_table,
    table_schema,
)

FINGERPRINT = "f" * 16


def metadata(**changes: object) -> FeatureTableMetadata:
    base = FeatureTableMetadata(
        entity=FeatureEntity.ITEM, table="item_id", num_rows=6, dim=DIM, model_name="fake/model",
        weights_hash="0" * 64, engine="fake", pooling="mean", normalize=True, max_length=32, dtype="float32",
        template_version=1, template_hash="1" * 64, dataset_name="tiny", dataset_fingerprint=FINGERPRINT,
        created_at="2026-01-01T00:00:00+00:00")
    return replace(base, **changes)


def vectors_for(keys: np.ndarray) -> np.ndarray:
    return np.stack([np.full(DIM, float(k), np.float32) for k in keys])


def write(path: Path, keys: list[int], meta: FeatureTableMetadata | None = None) -> Path:
    k = np.array(keys, dtype=np.int64)
    write_table_file(path, k, vectors_for(k), meta or metadata())
    return path


def load(path: Path, **kwargs: object):
    args = {"expect_fingerprint": FINGERPRINT, "expect_entity": "item", **kwargs}
    return load_feature_table(path, **args)


# --- format -----------------------------------------------------------------------------------------


def test_round_trip_keeps_fixed_size_list_and_metadata(tmp_path: Path) -> None:
    path = write(tmp_path / "t.parquet", [2, 3, 4, 5])
    schema = pq.read_schema(path)
    assert schema.field("key").type == pa.int64()
    emb_type = schema.field("embedding").type
    assert pa.types.is_fixed_size_list(emb_type) and emb_type.list_size == DIM
    assert emb_type.value_type == pa.float32() and not isinstance(emb_type, pa.ExtensionType)
    assert schema.remove_metadata().equals(table_schema(DIM))
    assert json.loads(schema.metadata[METADATA_KEY])["entity"] == "item"

    t = load(path, expect_dim=DIM, expect_table="item_id")
    assert t.embeddings.shape == (6, DIM) and str(t.embeddings.dtype) == "torch.float32"
    assert t.mask.tolist() == [False, False, True, True, True, True]  # 0 and 1: padding and unknown
    assert t.num_missing == 0
    np.testing.assert_array_equal(t.embeddings[3].numpy(), np.full(DIM, 3.0))
    assert t.embeddings[:2].abs().sum() == 0
    assert t.metadata == metadata()


@pytest.mark.parametrize(("expect", "field"), [
    ({"expect_fingerprint": "other"}, "dataset_fingerprint"),
    ({"expect_entity": "user"}, "entity"),
    ({"expect_dim": 16}, "dim"),
    ({"expect_table": "title"}, "table"),
])
def test_metadata_mismatch_names_the_field(tmp_path: Path, expect: dict, field: str) -> None:
    path = write(tmp_path / "t.parquet", [2, 3, 4, 5])
    with pytest.raises(FeatureTableError, match=rf"t\.parquet: {field} is .* but the caller expects"):
        load(path, **expect)


def test_missing_keys_are_an_error_or_zero_with_mask(tmp_path: Path) -> None:
    path = write(tmp_path / "t.parquet", [2, 4])
    with pytest.raises(FeatureTableError, match=r"2 of 4 keys have no vector, e\.g\. \[3, 5\]"):
        load(path)
    t = load(path, missing="zero")
    assert t.num_missing == 2 and t.mask.tolist() == [False, False, True, False, True, False]
    assert t.embeddings[3].abs().sum() == 0
    assert load(path, missing="zero", num_rows=5).embeddings.shape == (5, DIM)


def test_refuses_keys_out_of_range_and_reserved_keys(tmp_path: Path) -> None:
    path = write(tmp_path / "t.parquet", [2, 3, 4, 5])
    with pytest.raises(FeatureTableError, match=r"key 5 is outside \[0, 5\)"):
        load(path, num_rows=5)
    with pytest.raises(FeatureTableError, match="reserved key 1"):
        load(write(tmp_path / "r.parquet", [1, 2, 3, 4, 5]))
    field_meta = metadata(entity=FeatureEntity.FIELD, table="field", num_rows=3)
    t = load_feature_table(write(tmp_path / "f.parquet", [0, 1, 2], field_meta), expect_fingerprint=FINGERPRINT,
                           expect_entity="field")
    assert t.mask.all()  # field positions reserve nothing


def test_refuses_duplicate_keys_across_parts(tmp_path: Path) -> None:
    parts = tmp_path / "table" / "parts"
    parts.mkdir(parents=True)
    write(parts / "part-00000-of-00002.parquet", [2, 3, 4])
    write(parts / "part-00001-of-00002.parquet", [4, 5])
    with pytest.raises(FeatureTableError, match=r"key 4 appears more than once .*part-00000.*part-00001"):
        load(tmp_path / "table")


def test_refuses_nan_vectors(tmp_path: Path) -> None:
    keys = np.array([2, 3], dtype=np.int64)
    bad = vectors_for(keys)
    bad[1, 0] = np.nan
    with pytest.raises(FeatureTableError, match=r"NaN or inf .* \[3\]"):
        write_table_file(tmp_path / "w.parquet", keys, bad, metadata())
    # a file with NaN written by something else: the reader refuses it too
    table = pa.Table.from_arrays(
        [pa.array(keys), pa.FixedSizeListArray.from_arrays(pa.array(bad.reshape(-1)), DIM)],
        schema=metadata().arrow_schema())
    pq.write_table(table, tmp_path / "nan.parquet")
    with pytest.raises(FeatureTableError, match=r"nan\.parquet: 1 vector\(s\) with NaN or inf, e\.g\. key 3"):
        load(tmp_path / "nan.parquet", missing="zero")


def test_refuses_corrupt_and_foreign_files(tmp_path: Path) -> None:
    corrupt = tmp_path / "table" / "parts" / "part-00000-of-00001.parquet"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(FeatureTableError, match=r"part-00000-of-00001\.parquet: not a readable Parquet file"):
        load(tmp_path / "table")
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"key": [2], "embedding": [[0.0] * DIM]}), plain)
    with pytest.raises(FeatureTableError, match=r"plain\.parquet: no 'llmctr\.feature_table' metadata"):
        load(plain)
    variable = tmp_path / "variable.parquet"
    pq.write_table(pa.table({"key": pa.array([2], pa.int64()), "embedding": pa.array([[0.0] * DIM], pa.list_(
        pa.float32()))}).replace_schema_metadata({METADATA_KEY: metadata().to_json()}), variable)
    with pytest.raises(FeatureTableError, match=r"variable\.parquet: column 'embedding' is list<.*expected fixed_size"):
        load(variable)
    with pytest.raises(FeatureTableError, match="does not exist"):
        load(tmp_path / "nowhere")


# --- the table folder: manifest, parts, merge ------------------------------------------------------------


def test_folder_refuses_a_rerun_with_another_model_or_plan(tmp_path: Path) -> None:
    keys = np.arange(2, 6)
    folder = TableFolder(tmp_path / "item")
    plan = TablePlan.for_keys(keys, 2)
    first = folder.start(metadata(), plan)
    # a rerun gets the first run's metadata back (creation time included), so all parts carry the same
    assert folder.start(metadata(created_at="later", model_path="/elsewhere"), plan) == first
    with pytest.raises(FeatureTableError, match=r"made with weights_hash='0+', this run has weights_hash='9+'"):
        folder.start(metadata(weights_hash="9" * 64), plan)
    with pytest.raises(FeatureTableError, match="another --part-size"):
        folder.start(metadata(), TablePlan.for_keys(keys, 3))


def test_resume_refuses_a_damaged_finished_part(tmp_path: Path) -> None:
    keys = np.arange(2, 6)
    folder = TableFolder(tmp_path / "item")
    plan = TablePlan.for_keys(keys, 2)
    meta = folder.start(metadata(), plan)
    folder.write_part(0, plan, keys[:2], vectors_for(keys[:2]), meta)
    assert folder.finished_parts(meta, plan, keys) == {0}
    assert not folder.merge_if_complete(meta, plan)
    folder.part_path(0, plan).write_bytes(b"garbage")
    with pytest.raises(FeatureTableError, match=r"part-00000-of-00002\.parquet: not a readable .*delete "
                                                r"part-00000-of-00002\.parquet and rerun"):
        folder.finished_parts(meta, plan, keys)


# --- jobs with a fake engine ------------------------------------------------------------------------------


def read_table_dir(folder: Path) -> dict[int, np.ndarray]:
    t = pq.read_table(folder / "table.parquet")
    return dict(zip(t.column("key").to_pylist(), t.column("embedding").to_numpy(zero_copy_only=False), strict=True))


def test_shards_together_equal_one_run(tiny_prepared, tmp_path: Path) -> None:
    _, prepared_dir, schema = tiny_prepared
    whole, _ = run_fake(tmp_path / "one", prepared_dir, "feature")
    s0, _ = run_fake(tmp_path / "two", prepared_dir, "feature", shard=0, num_shards=2)
    assert not any(t.merged for t in s0.tables if t.parts_total > 1)  # shard 1's parts are still missing
    s1, _ = run_fake(tmp_path / "two", prepared_dir, "feature", shard=1, num_shards=2)
    assert all(t.merged for t in s1.tables) and all(t.merged for t in whole.tables)
    written = [t.parts_written for t in s0.tables + s1.tables]
    assert sum(written) == sum(t.parts_total for t in whole.tables)
    for t in whole.tables:
        name = t.folder.name
        one, two = read_table_dir(t.folder), read_table_dir(tmp_path / "two" / "feature" / name)
        assert one.keys() == two.keys()
        assert all(np.array_equal(one[k], two[k]) for k in one)
        field = schema.field(name)
        loaded = load_feature_table(tmp_path / "two" / "feature" / name, expect_fingerprint=schema.fingerprint,
                                    expect_entity="feature", expect_table=name, num_rows=field.vocab_size)
        assert loaded.num_missing == 0 and loaded.embeddings.shape == (field.vocab_size, DIM)


def test_shards_in_separate_folders_partition_the_keys(tiny_prepared, tmp_path: Path) -> None:
    _, prepared_dir, schema = tiny_prepared
    run_fake(tmp_path / "s0", prepared_dir, "item", shard=0, num_shards=2)
    run_fake(tmp_path / "s1", prepared_dir, "item", shard=1, num_shards=2)
    keys = [pq.read_table(p).column("key").to_pylist() for s in ("s0", "s1")
            for p in sorted((tmp_path / s / "item" / "parts").glob("part-*.parquet"))]
    flat = sorted(k for part in keys for k in part)
    assert flat == list(range(2, schema.field("item_id").vocab_size))  # every key once, none twice


def test_crash_then_rerun_skips_finished_parts(tiny_prepared, tmp_path: Path) -> None:
    _, prepared_dir, schema = tiny_prepared
    reference, _ = run_fake(tmp_path / "ref", prepared_dir, "user")
    crashing = FakeEngine(FAKE_MODEL, crash_after_texts=4)  # dies during the third batch (part 2 of 3)
    with pytest.raises(KeyboardInterrupt):
        run_fake(tmp_path / "out", prepared_dir, "user", engine=crashing)
    assert crashing.closed
    parts = sorted(p.name for p in (tmp_path / "out" / "user" / "parts").glob("part-*.parquet"))
    assert parts == ["part-00000-of-00002.parquet"]
    with pytest.raises(FeatureTableError, match="only 1 of 2 parts are written: the job is unfinished"):
        load_feature_table(tmp_path / "out" / "user", expect_fingerprint=schema.fingerprint, expect_entity="user")
    result, engine = run_fake(tmp_path / "out", prepared_dir, "user")
    assert result.tables[0].parts_found == 1 and result.tables[0].parts_written == 1
    assert len(engine.embedded) == schema.field("user_id").vocab_size - 2 - 3  # only the unfinished part
    ref, out = read_table_dir(tmp_path / "ref" / "user"), read_table_dir(tmp_path / "out" / "user")
    assert ref.keys() == out.keys() and all(np.array_equal(ref[k], out[k]) for k in ref)
    assert reference.tables[0].merged

    again, idle = run_fake(tmp_path / "out", prepared_dir, "user")
    assert not again.engine_started and idle.embedded == []  # finished: the engine never starts


def test_one_job_embeds_several_entities_with_one_engine(tiny_prepared, tmp_path: Path) -> None:
    _, prepared_dir, schema = tiny_prepared
    starts = []

    def start() -> FakeEngine:
        starts.append(FakeEngine(FAKE_MODEL))
        return starts[-1]

    job = JobOptions(entities=(FeatureEntity.FIELD, FeatureEntity.ITEM, FeatureEntity.USER), dataset=prepared_dir,
                     out=tmp_path, part_size=4, progress=False)
    result = run_job(job, FAKE_MODEL, start)
    assert len(starts) == 1 and starts[0].closed
    assert [t.folder.name for t in result.tables] == ["field", "item", "user"] and all(t.merged for t in result.tables)
    field = load_feature_table(tmp_path / "field", expect_fingerprint=schema.fingerprint, expect_entity="field")
    assert field.embeddings.shape == (len(schema.fields), DIM) and field.mask.all()


def test_recsys_imports_no_language_model_stack() -> None:
    code = ("import sys, recsys, recsys.features, recsys.data; "
            "bad = [m for m in ('vllm', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
