"""Data preparation and loading: a tiny generic-table dataset built here (labels, vocabularies, unknown
values, catalogues, multi-valued fields, determinism, the time split, leak-free histories, bad input and the
command line), the real MovieLens-100K (recbole's copy and a GroupLens-layout folder written from it), the
real MovieLens-1M from the shared data folder, and the ``ParquetBatches`` loader."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import (
    REPO_ROOT,
    TINY_FIELDS,
    TINY_GENRES_MAX,
    TINY_HISTORY_LENGTH,
    UNSEEN_DEVICE,
    TinyDataset,
    make_tiny,
)

from recsys.data.prepare import SPLITS, prepare
from recsys.data.schema import (
    FIRST_ID,
    PAD_ID,
    UNK_ID,
    FieldKind,
    PreparedSchema,
    SchemaError,
    load_schema,
)
from recsys.data.sources import ML100K_GENRES, DataError, default_root, read_source, recbole_ml100k_dir
from recsys.prepare import main as prepare_main

SPARSE_ORDER = [f["name"] for f in TINY_FIELDS if f["kind"] != "dense"]
DENSE_ORDER = [f["name"] for f in TINY_FIELDS if f["kind"] == "dense"]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def read_split(folder: Path, split: str) -> pd.DataFrame:
    return pq.read_table(Path(folder) / f"{split}.parquet").to_pandas()


def vocab_values(folder: Path, prepared: PreparedSchema, field: str) -> np.ndarray:
    """Raw value of each id of a field's vocabulary (id i at position i)."""
    f = prepared.field(field)
    v = pq.read_table(Path(folder) / f.vocab_file).to_pandas()
    assert v["id"].tolist() == list(range(len(v)))
    return v["value"].to_numpy(dtype=object)


def decode(values: np.ndarray, ids) -> list[str]:
    return [values[i] for i in np.asarray(ids, dtype=np.int64)]


def raw_joined(ds: TinyDataset) -> pd.DataFrame:
    """Interactions joined with their users and items, indexed by row number."""
    df = ds.interactions.merge(ds.users, on="user_id", how="left").merge(ds.items, on="item_id", how="left")
    df.index = df["row_no"].astype(int).to_numpy()
    return df.sort_index()


def expected_history(raw: pd.DataFrame, user: str, ts: float, length: int) -> pd.DataFrame:
    """Brute force: the user's raw interactions with a strictly earlier timestamp, oldest first (ties in file
    order), the most recent ``length`` of them."""
    earlier = raw[(raw["user_id"] == user) & (raw["ts"] < ts)]
    return earlier.sort_values(["ts", "file_order"], kind="stable").tail(length)


def all_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------
# 1. tiny generic-table dataset
# --------------------------------------------------------------------------------------------------


def test_tiny_prepared_layout(tiny_prepared):
    ds, out, prepared = tiny_prepared
    names = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    owners = [f["name"] for f in TINY_FIELDS if f["kind"] != "dense" and "share_vocab" not in f]
    assert names == {"schema.json", "train.parquet", "valid.parquet", "test.parquet",
                     *(f"vocab/{n}.parquet" for n in owners)}
    assert PreparedSchema.load(out) == prepared
    assert [f.name for f in prepared.fields] == [f["name"] for f in TINY_FIELDS]
    assert prepared.split_method == "time"
    hist = prepared.field("hist_item_id")
    assert (hist.table, hist.vocab_file) == ("item_id", "vocab/item_id.parquet")
    assert hist.vocab_size == prepared.field("item_id").vocab_size
    assert prepared.field("hist_genre").table == "genres"
    assert hist.max_length == TINY_HISTORY_LENGTH and prepared.field("genres").max_length == TINY_GENRES_MAX
    assert prepared.field("age").vocab_size == 0 and prepared.field("age").vocab_file is None
    for split in SPLITS:
        df = read_split(out, split)
        assert len(df) == prepared.counts[split]
        assert ["label", *[f["name"] for f in TINY_FIELDS]] == list(df.columns)[: len(TINY_FIELDS) + 1]
        assert {"rating", "timestamp"} <= set(df.columns)


def test_label_rule(tiny_prepared):
    ds, out, prepared = tiny_prepared
    raw = raw_joined(ds)
    rating = raw["rating"].astype(float)
    seen: list[int] = []
    for split in SPLITS:
        df = read_split(out, split)
        rows = df["row_no"].astype(int).to_numpy()
        seen += rows.tolist()
        r = rating.loc[rows].to_numpy()
        assert not (r == 3).any(), f"{split} holds rating-3 rows, which the label rule drops"
        np.testing.assert_array_equal(df["label"].to_numpy(), (r > 3).astype(np.float32))
        np.testing.assert_array_equal(df["rating"].to_numpy(), r.astype(np.float32))
        assert prepared.stats["positive_rate"][split] == pytest.approx((r > 3).mean(), abs=1e-6)
    assert sorted(seen) == sorted(raw.index[rating != 3].tolist()), "labelled rows lost or duplicated"
    assert prepared.stats["rows_read"] == len(raw)
    assert prepared.stats["rows_dropped_by_label_rule"] == int((rating == 3).sum()) > 0
    assert sum(prepared.counts.values()) == int((rating != 3).sum())


def test_vocabulary_ids_map_back_to_raw_values(tiny_prepared):
    ds, out, prepared = tiny_prepared
    raw = raw_joined(ds)
    train = read_split(out, "train")
    for f in prepared.sparse_fields:
        if f.table != f.name:
            continue
        values = vocab_values(out, prepared, f.name)
        assert values[PAD_ID] == "<pad>" and values[UNK_ID] == "<unk>"
        assert len(values) == f.vocab_size
        real = values[FIRST_ID:].tolist()
        assert len(real) == len(set(real)) and "" not in real and "<unk>" not in real
    for name in ("user_id", "gender", "item_id", "device"):
        values = vocab_values(out, prepared, name)
        for split in SPLITS:
            df = read_split(out, split)
            ids = df[name].to_numpy()
            assert ids.dtype == np.int64 and (ids != PAD_ID).all()
            expected = raw.loc[df["row_no"].astype(int), name].tolist()
            if name == "device":
                expected = ["<unk>" if v == UNSEEN_DEVICE else v for v in expected]
            assert decode(values, ids) == expected, (name, split)
    # ids are ordered by training frequency, then by value; catalogue-only values come last
    counts = raw.loc[train["row_no"].astype(int), "user_id"].value_counts()
    order = sorted(counts.index, key=lambda v: (-counts[v], v))
    assert vocab_values(out, prepared, "user_id")[FIRST_ID:].tolist() == [*order, "u6"]


def test_value_text_column(tiny_prepared):
    ds, out, prepared = tiny_prepared
    v = pq.read_table(out / "vocab/gender.parquet").to_pandas()
    assert dict(zip(v["value"], v["text"], strict=True)) == {"<pad>": "<pad>", "<unk>": "<unk>",
                                                            "M": "male", "F": "female"}
    assert "text" not in pq.read_table(out / "vocab/user_id.parquet").column_names


def test_unseen_context_value_is_unknown_and_counted(tiny_prepared):
    ds, out, prepared = tiny_prepared
    assert UNSEEN_DEVICE not in vocab_values(out, prepared, "device")
    unknown = prepared.stats["unknown_values"]
    assert unknown["train"] == {}
    n_unseen = int((ds.interactions["device"] == UNSEEN_DEVICE).sum())
    assert unknown["valid"].get("device", 0) + unknown["test"].get("device", 0) == n_unseen == 3
    test = read_split(out, "test")
    raw = raw_joined(ds)
    is_tv = (raw.loc[test["row_no"].astype(int), "device"] == UNSEEN_DEVICE).to_numpy()
    assert is_tv.sum() == 3
    assert (test["device"].to_numpy()[is_tv] == UNK_ID).all()
    assert (test["device"].to_numpy()[~is_tv] >= FIRST_ID).all()


def test_side_table_catalogue_values_get_ids(tiny_prepared):
    ds, out, prepared = tiny_prepared
    raw_rows = ds.interactions
    assert "u6" not in set(raw_rows["user_id"]) and "i9" not in set(raw_rows["item_id"])
    users = vocab_values(out, prepared, "user_id").tolist()
    items = vocab_values(out, prepared, "item_id").tolist()
    genres = vocab_values(out, prepared, "genres").tolist()
    assert "u6" in users and "i9" in items and "Western" in genres
    # every catalogue value has an id, and the ids are past the values seen in training
    assert set(users[FIRST_ID:]) == set(ds.users["user_id"])
    assert set(items[FIRST_ID:]) == set(ds.items["item_id"])
    assert users[-1] == "u6" and items[-1] == "i9" and genres[-1] == "Western"
    assert prepared.field("user_id").vocab_size == len(ds.users) + FIRST_ID


def test_multi_valued_field_is_capped_list(tiny_prepared):
    ds, out, prepared = tiny_prepared
    raw = raw_joined(ds)
    values = vocab_values(out, prepared, "genres")
    lengths = []
    for split in SPLITS:
        table = pq.read_table(out / f"{split}.parquet")
        assert table.schema.field("genres").type == pa.list_(pa.int64())
        for seq in ("hist_item_id", "hist_rating", "hist_genre"):
            assert table.schema.field(seq).type == pa.list_(pa.int64())
        df = table.to_pandas()
        for row_no, ids in zip(df["row_no"].astype(int), df["genres"], strict=True):
            tokens = [t for t in raw.loc[row_no, "genres"].split("|") if t]
            assert decode(values, ids) == tokens[:TINY_GENRES_MAX]
            lengths.append(len(ids))
    assert max(lengths) == TINY_GENRES_MAX and min(lengths) == 0  # i3 is capped, i4 has no genres


def test_dense_fields(tiny_prepared):
    ds, out, prepared = tiny_prepared
    raw = raw_joined(ds)
    for split in SPLITS:
        df = read_split(out, split)
        assert df["row_no"].dtype == np.float32 and df["age"].dtype == np.float32
        rows = df["row_no"].astype(int)
        np.testing.assert_array_equal(df["age"].to_numpy(), raw.loc[rows, "age"].astype(np.float32).to_numpy())


# --------------------------------------------------------------------------------------------------
# 2. determinism and fingerprint
# --------------------------------------------------------------------------------------------------


def test_preparation_is_byte_identical(tiny, tmp_path):
    schema = load_schema(tiny.schema_path)
    a = prepare(schema, tmp_path / "a", progress=False)
    b = prepare(schema, tmp_path / "b", progress=False)
    fa, fb = all_files(tmp_path / "a"), all_files(tmp_path / "b")
    assert sorted(fa) == sorted(fb) and len(fa) >= 8
    for name in fa:
        assert fa[name] == fb[name], f"{name} differs between two preparations of the same input"
    assert a.fingerprint == b.fingerprint
    # preparing again into an existing prepared folder replaces it with the same bytes
    prepare(schema, tmp_path / "a", progress=False)
    assert all_files(tmp_path / "a") == fa


def test_fingerprint_follows_seed_and_raw_bytes(tiny, tmp_path):
    schema = load_schema(tiny.schema_path)
    base = prepare(schema, tmp_path / "a", progress=False).fingerprint
    seeded = prepare(replace(schema, split=replace(schema.split, seed=schema.split.seed + 1)), tmp_path / "b",
                     progress=False).fingerprint
    assert re.fullmatch(r"[0-9a-f]{16}", base)
    assert seeded != base
    tiny.set_line("interactions.csv", 2, tiny.lines("interactions.csv")[1].replace(",web,", ",app,"))
    assert prepare(schema, tmp_path / "c", progress=False).fingerprint != base


def test_random_split_follows_seed(tiny, tmp_path):
    def train_rows(seed: int, out: str) -> set[int]:
        s = load_schema(tiny.schema_path)
        s = replace(s, split=replace(s.split, method="random", seed=seed))
        p = prepare(s, tmp_path / out, progress=False)
        assert p.split_method == "random"
        return set(read_split(tmp_path / out, "train")["row_no"].astype(int))

    assert train_rows(1, "a") == train_rows(1, "b")
    assert train_rows(1, "a") != train_rows(2, "c")


def test_refuses_to_replace_a_foreign_folder(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a prepared dataset"):
        prepare(load_schema(tiny.schema_path), out, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"


# --------------------------------------------------------------------------------------------------
# 3. time split and histories
# --------------------------------------------------------------------------------------------------


def test_time_split_is_ordered(tiny_prepared):
    ds, out, prepared = tiny_prepared
    ts = {s: read_split(out, s)["timestamp"].to_numpy() for s in SPLITS}
    assert ts["train"].max() <= ts["valid"].min()
    assert ts["valid"].max() <= ts["test"].min()
    n = sum(prepared.counts.values())
    assert prepared.counts["train"] == n * 8 // 10 and prepared.counts["valid"] == n // 10


def test_histories_match_brute_force(tiny_prepared):
    ds, out, prepared = tiny_prepared
    raw = raw_joined(ds)
    raw["ts"] = raw["timestamp"].astype(float)
    raw["file_order"] = raw.index
    # the fixture must exercise ties: some user has several interactions at one timestamp
    assert raw.duplicated(["user_id", "ts"]).any()
    item_vocab = vocab_values(out, prepared, "item_id")
    rating_vocab = vocab_values(out, prepared, "hist_rating")
    genre_vocab = vocab_values(out, prepared, "genres")
    capped = with_tie_before = 0
    for split in SPLITS:
        df = read_split(out, split)
        for _, row in df.iterrows():
            me = raw.loc[int(row["row_no"])]
            exp = expected_history(raw, me["user_id"], me["ts"], TINY_HISTORY_LENGTH)
            assert int(me["row_no"]) not in exp.index
            assert (exp["ts"] < me["ts"]).all()
            assert decode(item_vocab, row["hist_item_id"]) == exp["item_id"].tolist(), me.to_dict()
            assert decode(rating_vocab, row["hist_rating"]) == exp["rating"].tolist(), me.to_dict()
            first_genre = [g.split("|")[0] if g else "<unk>" for g in exp["genres"]]
            assert decode(genre_vocab, row["hist_genre"]) == first_genre, me.to_dict()
            n_earlier = int(((raw["user_id"] == me["user_id"]) & (raw["ts"] < me["ts"])).sum())
            capped += n_earlier > TINY_HISTORY_LENGTH
            same_time = (raw["user_id"] == me["user_id"]) & (raw["ts"] == me["ts"])
            with_tie_before += int(same_time.sum()) > 1
    assert capped > 0 and with_tie_before > 0, "the fixture no longer exercises the cap and ties"


def test_history_is_oldest_first_and_keeps_the_most_recent(tmp_path):
    """One user, strictly increasing timestamps: histories are sliding windows of the previous items."""
    ds = make_tiny(tmp_path / "seq")
    n = 30
    ds.interactions = pd.DataFrame({
        "user_id": ["u1"] * n, "item_id": [f"i{1 + k % 8}" for k in range(n)],
        "rating": ["5" if k % 2 else "1" for k in range(n)], "timestamp": [str(100 + k) for k in range(n)],
        "device": ["web"] * n, "row_no": [str(k) for k in range(n)]})
    ds.write()
    prepared = prepare(load_schema(ds.schema_path), tmp_path / "out", progress=False)
    item_vocab = vocab_values(tmp_path / "out", prepared, "item_id")
    for split in SPLITS:
        df = read_split(tmp_path / "out", split)
        for k, hist in zip(df["row_no"].astype(int), df["hist_item_id"], strict=True):
            window = range(max(0, k - TINY_HISTORY_LENGTH), k)
            assert decode(item_vocab, hist) == [f"i{1 + j % 8}" for j in window]


# --------------------------------------------------------------------------------------------------
# 4. bad input
# --------------------------------------------------------------------------------------------------


def _drop_column(column: str):
    def change(ds: TinyDataset) -> None:
        ds.interactions = ds.interactions.drop(columns=[column])
        ds.write()
    return change


def _schema_change(fn):
    def change(ds: TinyDataset) -> None:
        fn(ds.schema)
        ds.write_schema()
    return change


def _rename_field(schema: dict, old: str, new: str) -> None:
    next(f for f in schema["fields"] if f["name"] == old)["name"] = new


def _non_utf8(ds: TinyDataset) -> None:
    path = ds.raw / "users.csv"
    lines = path.read_bytes().split(b"\n")
    lines[2] = b"u2,F\xff,34"
    path.write_bytes(b"\n".join(lines))


def _symlink_out(ds: TinyDataset) -> None:
    outside = ds.folder.parent / "outside.csv"
    shutil.copy(ds.raw / "users.csv", outside)
    (ds.raw / "users.csv").unlink()
    os.symlink(outside, ds.raw / "users.csv")


def _too_few_rows(ds: TinyDataset) -> None:
    ds.interactions = ds.interactions[ds.interactions["rating"] != "3"].head(4)
    ds.write()


BAD_INPUT = [
    # id, change, error type, regex the message must match
    ("malformed-row", lambda ds: ds.insert_line("interactions.csv", 12, "u1,i1,4"), DataError,
     r"interactions\.csv\b.*\b12\b.*(columns|Expected)"),
    ("missing-interactions", lambda ds: (ds.raw / "interactions.csv").unlink(), DataError,
     r"missing file: .*raw/interactions\.csv"),
    ("missing-side-table", lambda ds: (ds.raw / "items.csv").unlink(), DataError, r"missing file: .*raw/items\.csv"),
    ("missing-schema", lambda ds: ds.schema_path.unlink(), SchemaError, r"schema file .*schema\.yaml does not exist"),
    ("non-utf8", _non_utf8, DataError, r"users\.csv, line 3: bytes that are not valid utf-8"),
    ("missing-rating-column", _drop_column("rating"), DataError,
     r"interactions\.csv: missing column 'rating'"),
    ("missing-item-column", _drop_column("item_id"), DataError,
     r"interactions\.csv: the schema names column\(s\) 'item_id' \(source\.item_column\), which the file does not"),
    ("misspelled-timestamp-column", _schema_change(lambda s: s["source"].update(timestamp_column="tstamp")),
     DataError, r"interactions\.csv: the schema names column\(s\) 'tstamp' \(source\.timestamp_column\)"),
    ("one-class", _schema_change(lambda s: s["label"].update(positive_above=5, negative_below=5, max_value=9)),
     DataError, r"the train split has one class .*all non-clicks.*binary: true"),
    ("binary-label-not-0-1", _schema_change(lambda s: s["label"].update(binary=True)), DataError,
     r"interactions\.csv, line 2, column 'rating': \d is not 0 or 1, which label\.binary asks for"),
    ("missing-field-column", _schema_change(lambda s: s["fields"][1].update(column="colour")), DataError,
     r"schema\.yaml: field 'gender': column 'colour' is in none of the source tables"),
    ("non-numeric-rating", lambda ds: ds.set_line("interactions.csv", 12, "u1,i1,four,1001,web,10"), DataError,
     r"interactions\.csv, line 12, column 'rating': 'four' is not a number"),
    ("non-numeric-timestamp", lambda ds: ds.set_line("interactions.csv", 9, "u1,i1,4,noon,web,7"), DataError,
     r"interactions\.csv, line 9, column 'timestamp': 'noon' is not a timestamp"),
    ("non-numeric-dense", lambda ds: ds.set_line("users.csv", 4, "u3,M,old"), DataError,
     r"users\.csv, line 4, column 'age': 'old' is not a number"),
    ("rating-above-max", lambda ds: ds.set_line("interactions.csv", 12, "u1,i1,7,1001,web,10"), DataError,
     r"interactions\.csv, line 12, column 'rating': 7 is outside the label rule's range \[1, 5\]"),
    ("rating-below-min", lambda ds: ds.set_line("interactions.csv", 5, "u1,i1,0,1001,web,3"), DataError,
     r"interactions\.csv, line 5, column 'rating': 0 is outside"),
    ("empty-split", _too_few_rows, DataError, r"schema\.yaml: the valid split is empty \(4 labelled rows\)"),
    ("unknown-top-level-key", _schema_change(lambda s: s.update(colour="red")), SchemaError,
     r"schema\.yaml: unknown key\(s\) \['colour'\]"),
    ("unknown-field-key", _schema_change(lambda s: s["fields"][1].update(colour="red")), SchemaError,
     r"schema\.yaml: fields\[1\] \(gender\): unknown key\(s\) \['colour'\]"),
    ("unknown-table-key", _schema_change(lambda s: s["source"]["users"].update(delimiter=";")), SchemaError,
     r"schema\.yaml: source\.users: unknown key\(s\) \['delimiter'\]"),
    ("unknown-kind", _schema_change(lambda s: s["fields"][1].update(kind="categorial")), SchemaError,
     r"schema\.yaml: fields\[1\] \(gender\): .*categorial"),
    ("field-name-with-slash", _schema_change(lambda s: _rename_field(s, "device", "ctx/device")), SchemaError,
     r"schema\.yaml: field 'ctx/device': a field name must match"),
    ("field-name-dotdot", _schema_change(lambda s: _rename_field(s, "device", "../device")), SchemaError,
     r"schema\.yaml: field '\.\./device': a field name must match"),
    ("root-escapes", _schema_change(lambda s: s["source"].update(root="../x")), SchemaError,
     r"schema\.yaml: source\.root: path '\.\./x' leaves the folder"),
    ("absolute-root", _schema_change(lambda s: s["source"].update(root="/tmp")), SchemaError,
     r"source\.root: path '/tmp' leaves the folder"),
    ("table-path-escapes", _schema_change(lambda s: s["source"]["users"].update(path="../schema.yaml")),
     SchemaError, r"schema\.yaml: source\.users: path '\.\./schema\.yaml' leaves the folder"),
    ("symlink-escapes", _symlink_out, SchemaError, r"source\.users: path 'users\.csv' leaves the folder"),
    ("duplicate-side-key", lambda ds: ds.insert_line("users.csv", 6, "u2,M,40"), DataError,
     r"users\.csv, line 6: duplicate user_id 'u2'"),
    ("bad-yaml", lambda ds: ds.schema_path.write_text("name: [unclosed\n"), SchemaError,
     r"schema\.yaml: not valid YAML"),
    ("bad-ratios", _schema_change(lambda s: s["split"].update(ratios=[0.8, 0.1, 0.2])), SchemaError,
     r"schema\.yaml: split\.ratios must be three positive numbers that sum to 1"),
]


@pytest.mark.parametrize(("change", "error", "pattern"), [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_raises_a_clear_error(tiny, tmp_path, change, error, pattern):
    change(tiny)
    with pytest.raises(error) as info:
        prepare(load_schema(tiny.schema_path), tmp_path / "out", progress=False)
    assert re.search(pattern, str(info.value)), str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("change", "pattern"), [(c[1], c[3]) for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_cli_reports_bad_input(tiny, tmp_path, capsys, change, pattern):
    change(tiny)
    rc = prepare_main(["--dataset", str(tiny.schema_path), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    line = next((ln for ln in err.splitlines() if ln.startswith("error: ")), None)
    assert line is not None, err
    assert re.search(pattern, line), line


def test_malformed_row_message_names_the_line(tiny, tmp_path):
    tiny.insert_line("interactions.csv", 12, "u1,i1,4")
    with pytest.raises(DataError, match=r"interactions\.csv, line 12: malformed row, expected 6 columns"):
        prepare(load_schema(tiny.schema_path), tmp_path / "out", progress=False)


def test_line_numbers_count_blank_lines(tiny, tmp_path):
    tiny.insert_line("interactions.csv", 5, "")
    tiny.set_line("interactions.csv", 12, "u1,i1,four,1001,web,10")
    with pytest.raises(DataError, match=r"interactions\.csv, line 12, column 'rating'"):
        prepare(load_schema(tiny.schema_path), tmp_path / "out", progress=False)


def test_interaction_with_user_missing_from_side_table(tiny, tmp_path):
    tiny.set_line("interactions.csv", 5, "u7,i1,4,1001,web,3")
    prepared = prepare(load_schema(tiny.schema_path), tmp_path / "out", progress=False)
    rows = pd.concat([read_split(tmp_path / "out", s) for s in SPLITS])
    row = rows[rows["row_no"] == 3].iloc[0]
    assert row["gender"] == UNK_ID and row["age"] == 0.0
    assert "u7" in vocab_values(tmp_path / "out", prepared, "user_id")


def test_interaction_with_item_missing_from_side_table(tiny, tmp_path):
    tiny.set_line("interactions.csv", 5, "u1,i77,4,1001,web,3")
    prepared = prepare(load_schema(tiny.schema_path), tmp_path / "out", progress=False)
    rows = pd.concat([read_split(tmp_path / "out", s) for s in SPLITS])
    row = rows[rows["row_no"] == 3].iloc[0]
    assert len(row["genres"]) == 0  # no item row: no genres
    items = vocab_values(tmp_path / "out", prepared, "item_id")
    assert items[row["item_id"]] == "i77" or row["item_id"] == UNK_ID


def test_cli_prepares_and_help(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert prepare_main(["--dataset", str(tiny.schema_path), "--out", str(out), "--seed", "5",
                         "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "prepared tiny" in text and "split (time)" in text and "unknown values mapped to <unk>" in text
    prepared = PreparedSchema.load(out)
    assert prepared.source["split_seed"] == 5
    with pytest.raises(SystemExit) as info:
        prepare_main(["--help"])
    assert info.value.code == 0
    assert "--dataset" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        prepare_main([])  # --dataset and --out are required
    assert info.value.code == 2


# --------------------------------------------------------------------------------------------------
# 5. MovieLens-100K from the recbole package
# --------------------------------------------------------------------------------------------------


def _recbole_dir() -> Path:
    d = recbole_ml100k_dir()
    if d is None:
        pytest.skip("the recbole package (which ships MovieLens-100K) is not installed")
    return d


def _read_recbole(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    df.columns = [c.split(":")[0] for c in df.columns]
    return df


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory):
    d = _recbole_dir()
    out = tmp_path_factory.mktemp("ml100k") / "prepared"
    prepared = prepare(load_schema("ml-100k"), out, progress=False)
    raw = _read_recbole(d / "ml-100k.inter")
    return out, prepared, raw


def test_ml100k_counts_and_time_split(ml100k):
    out, prepared, raw = ml100k
    rating = raw["rating"].astype(float)
    assert len(raw) == 100_000
    assert prepared.stats["rows_read"] == 100_000
    assert prepared.stats["rows_dropped_by_label_rule"] == int((rating == 3).sum()) > 0
    assert prepared.split_method == "time"
    n = 100_000 - int((rating == 3).sum())
    assert prepared.counts == {"train": n * 8 // 10, "valid": n // 10, "test": n - n * 8 // 10 - n // 10}
    labels = {s: read_split(out, s) for s in SPLITS}
    assert sum(int(df["label"].sum()) for df in labels.values()) == int((rating > 3).sum())
    assert labels["train"]["timestamp"].max() <= labels["valid"]["timestamp"].min()
    assert labels["valid"]["timestamp"].max() <= labels["test"]["timestamp"].min()
    assert {"hist_item_id", "hist_genre", "hist_rating"} <= set(labels["train"].columns)
    assert prepared.stats["skipped_fields"] == []


def test_ml100k_histories_are_leak_free(ml100k):
    out, prepared, raw = ml100k
    raw = raw.assign(ts=raw["timestamp"].astype(float), file_order=np.arange(len(raw)))
    by_key = {(u, i): k for k, (u, i) in enumerate(zip(raw["user_id"], raw["item_id"], strict=True))}
    assert len(by_key) == len(raw)  # (user, item) names a row
    per_user = {u: g.sort_values(["ts", "file_order"], kind="stable") for u, g in raw.groupby("user_id")}
    users = vocab_values(out, prepared, "user_id")
    items = vocab_values(out, prepared, "item_id")
    length = prepared.field("hist_item_id").max_length
    rng = np.random.default_rng(0)
    full = nonempty = 0
    for split in SPLITS:
        df = read_split(out, split)
        for r in rng.choice(len(df), size=150, replace=False):
            row = df.iloc[r]
            u, i = users[row["user_id"]], items[row["item_id"]]
            me = raw.iloc[by_key[(u, i)]]
            assert float(row["timestamp"]) == me["ts"]
            hist = decode(items, row["hist_item_id"])
            mine = per_user[u]
            for h in hist:  # every history item is the same user's, and strictly earlier
                assert raw.iloc[by_key[(u, h)]]["ts"] < me["ts"]
            assert hist == mine[mine["ts"] < me["ts"]].tail(length)["item_id"].tolist()
            nonempty += len(hist) > 0
            full += len(hist) == length
    assert nonempty > 0 and full > 0


def _write_grouplens(rec: Path, folder: Path, n_rows: int = 300) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """A GroupLens-layout ml-100k folder holding the first ``n_rows`` ratings (of movies with a known year)."""
    inter, items, users = (_read_recbole(rec / f"ml-100k.{p}") for p in ("inter", "item", "user"))
    items = items[items["release_year"].str.fullmatch(r"\d{4}")]
    inter = inter[inter["item_id"].isin(items["item_id"])].head(n_rows)
    # the ratings' movies, plus one with a non-ASCII title (to exercise latin-1)
    extra = items.loc[~items["movie_title"].map(str.isascii), "item_id"].iloc[:1]
    items = items[items["item_id"].isin(inter["item_id"]) | items["item_id"].isin(extra)]
    assert not items["movie_title"].map(str.isascii).all()
    users = users[users["user_id"].isin(inter["user_id"])]
    folder.mkdir(parents=True)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in inter.itertuples(index=False)))
    lines = []
    for item_id, title, year, genres in items.itertuples(index=False):
        flags = "|".join("1" if g in genres.split(" ") else "0" for g in ML100K_GENRES)
        lines.append(f"{item_id}|{title} ({year})|01-Jan-{year}||http://example.org/{item_id}|{flags}\n")
    (folder / "u.item").write_bytes("".join(lines).encode("latin-1"))
    (folder / "u.user").write_bytes("".join("|".join(r) + "\n" for r in users.itertuples(index=False))
                                    .encode("latin-1"))
    return inter, items, users


def test_ml100k_grouplens_layout_reads_the_same(tmp_path):
    rec = _recbole_dir()
    schema = load_schema("ml-100k")
    inter, items, users = _write_grouplens(rec, tmp_path / "ml-100k")
    gl = read_source(schema, tmp_path / "ml-100k")
    ref = read_source(schema, rec)
    assert gl.has_timestamp and [p.name for p in gl.files] == ["u.data", "u.item", "u.user"]

    def same(a: pd.DataFrame, b: pd.DataFrame, key: str, keys) -> None:
        b = b[b[key].isin(keys)]
        assert list(a.columns) == list(b.columns)
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_dtype=False)

    assert list(gl.interactions.columns) == list(ref.interactions.columns) == ["user_id", "item_id", "rating",
                                                                                  "timestamp"]
    pd.testing.assert_frame_equal(gl.interactions.reset_index(drop=True), inter.reset_index(drop=True),
                                  check_dtype=False)
    same(gl.items, ref.items, "item_id", items["item_id"])
    same(gl.users, ref.users, "user_id", users["user_id"])
    assert list(gl.items.columns) == ["item_id", "title", "year", "genres"]
    assert list(gl.users.columns) == ["user_id", "age", "gender", "occupation", "zip"]
    prepared = prepare(schema, tmp_path / "out", root=tmp_path / "ml-100k", progress=False)
    assert prepared.stats["rows_read"] == len(inter) and prepared.split_method == "time"
    assert prepared.source["files"] == ["u.data", "u.item", "u.user"]
    assert "hist_item_id" in read_split(tmp_path / "out", "train").columns


def test_ml100k_missing_folder_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"not a MovieLens-100K folder"):
        read_source(load_schema("ml-100k"), tmp_path / "empty")


# --------------------------------------------------------------------------------------------------
# 6. MovieLens-1M from the shared data folder
# --------------------------------------------------------------------------------------------------


def _ml1m_dir() -> Path | None:
    candidates = []
    if "RECSYS_DATA_DIR" in os.environ:
        candidates.append(Path(os.environ["RECSYS_DATA_DIR"]) / "ml-1m")
    candidates += [Path("/work/shared/data/ml-1m"), REPO_ROOT / "../shared/data/ml-1m"]
    return next((c.resolve() for c in candidates if c.is_dir()), None)


def test_ml1m_prepares_to_the_known_counts(tmp_path):
    root = _ml1m_dir()
    if root is None:
        pytest.skip("the shared data is absent: no ml-1m folder at $RECSYS_DATA_DIR/ml-1m, /work/shared/data/ml-1m "
                    "or ../shared/data/ml-1m beside the repository")
    schema = load_schema("ml-1m")
    try:
        found = default_root(schema)
    except DataError:
        found = None
    out = tmp_path / "ml1m"
    prepared = prepare(schema, out, root=None if found is not None else root, progress=False)
    c, st = prepared.counts, prepared.stats
    assert st["rows_read"] == 1_000_209 and st["rows_dropped_by_label_rule"] == 261_197
    assert sum(c.values()) == 739_012
    assert c == {"train": 591_209, "valid": 73_901, "test": 73_902}
    positive = sum(st["positive_rate"][s] * c[s] for s in SPLITS) / sum(c.values())
    assert positive == pytest.approx(0.778, abs=0.0005)
    assert prepared.split_method == "random"
    assert prepared.source["has_timestamp"] is False and prepared.source["history_length"] is None
    assert st["skipped_fields"] == ["hist_item_id", "hist_genre", "hist_rating"]
    assert not any(f.kind is FieldKind.SEQUENCE for f in prepared.fields)
    columns = pq.read_schema(out / "train.parquet").names
    assert not any(n.startswith("hist_") for n in columns) and "timestamp" not in columns
    assert prepared.field("genres").max_length == 3
    assert vocab_values(out, prepared, "age").tolist()[FIRST_ID:] != []


# --------------------------------------------------------------------------------------------------
# 7. ParquetBatches
# --------------------------------------------------------------------------------------------------


def _rows_of(batch, dense_names: list[str]) -> list[dict]:
    """The real rows (weight 1) of a batch as dicts of label, dense values and per-key id lists."""
    per_key = batch.sparse_features.to_dict()
    lists = {k: [t.tolist() for t in jt.to_dense()] for k, jt in per_key.items()}
    rows = []
    for r in np.flatnonzero(batch.weights.numpy() == 1):
        row = {"label": float(batch.labels[r])}
        row.update({n: float(batch.dense_features[r, j]) for j, n in enumerate(dense_names)})
        row.update({k: lists[k][r] for k in lists})
        rows.append(row)
    return rows


def _parquet_rows(folder: Path, split: str) -> dict[int, dict]:
    df = read_split(folder, split)
    out = {}
    for _, r in df.iterrows():
        row = {"label": float(r["label"])}
        row.update({n: float(r[n]) for n in DENSE_ORDER})
        for k in SPARSE_ORDER:
            v = r[k]
            row[k] = [int(v)] if np.ndim(v) == 0 else [int(x) for x in v]
        out[int(r["row_no"])] = row
    return out


@pytest.mark.parametrize(("split", "batch_size"), [("train", 7), ("train", 16), ("train", 64), ("valid", 1),
                                                   ("test", 2), ("valid", 3)])
def test_loader_ranks_are_disjoint_and_complete(tiny_prepared, split, batch_size):
    from recsys.data.loader import ParquetBatches

    ds, out, prepared = tiny_prepared
    expected = _parquet_rows(out, split)
    assert pq.ParquetFile(out / "train.parquet").metadata.num_row_groups > 1
    seen: dict[int, int] = {}
    n_batches = []
    for rank in range(2):
        loader = ParquetBatches(out, split, prepared, batch_size=batch_size, rank=rank, world_size=2)
        batches = list(loader)
        n_batches.append(len(batches))
        assert len(batches) == len(loader)
        for b in batches:
            assert b.batch_size == batch_size and b.sparse_features.stride() == batch_size
            w = b.weights.numpy()
            assert set(np.unique(w)) <= {0.0, 1.0}
            pad = w == 0
            assert (b.labels.numpy()[pad] == 0).all() and (b.dense_features.numpy()[pad] == 0).all()
            for row in _rows_of(b, DENSE_ORDER):
                row_no = int(row["row_no"])
                assert row_no not in seen, f"row {row_no} is in rank {seen[row_no]} and rank {rank}"
                seen[row_no] = rank
                assert row == expected[row_no]
    assert n_batches[0] == n_batches[1]
    assert sorted(seen) == sorted(expected)
    # ranks hold contiguous ranges of the file, rank 0 first
    order = read_split(out, split)["row_no"].astype(int).tolist()
    assert [seen[r] for r in order] == sorted(seen[r] for r in order)


def test_loader_kjt_keys_and_lengths(tiny_prepared):
    from recsys.data.loader import ParquetBatches

    ds, out, prepared = tiny_prepared
    batch_size = 16
    df = read_split(out, "train")
    loader = ParquetBatches(out, "train", prepared, batch_size=batch_size)
    batches = list(loader)
    assert len(batches) == -(-len(df) // batch_size) and len(df) % batch_size  # the last batch is padded
    start = 0
    for b in batches:
        kjt = b.sparse_features
        assert kjt.keys() == SPARSE_ORDER == [f.name for f in prepared.sparse_fields]
        lengths = kjt.lengths().numpy().reshape(len(SPARSE_ORDER), batch_size)
        n = int(b.weights.sum())
        rows = df.iloc[start:start + n]
        start += n
        for k, key in enumerate(SPARSE_ORDER):
            kind = prepared.field(key).kind
            values = kjt[key].values().numpy()
            if kind is FieldKind.CATEGORICAL:
                assert (lengths[k] == 1).all()
                np.testing.assert_array_equal(values[:n], rows[key].to_numpy())
                assert (values[n:] == PAD_ID).all()
            else:
                np.testing.assert_array_equal(lengths[k, :n], rows[key].map(len).to_numpy())
                assert (lengths[k, n:] == 0).all()
                np.testing.assert_array_equal(values, np.concatenate([*rows[key], np.zeros(0, np.int64)]))
        assert kjt.values().dtype.is_floating_point is False
        np.testing.assert_array_equal(b.dense_features[:n, DENSE_ORDER.index("row_no")].numpy(),
                                      rows["row_no"].to_numpy())
    assert start == len(df)


def test_loader_shuffle_is_seeded_per_epoch(tiny_prepared):
    from recsys.data.loader import ParquetBatches

    ds, out, prepared = tiny_prepared
    col = DENSE_ORDER.index("row_no")

    def order(loader) -> list[int]:
        return [int(x) for b in loader for x, w in zip(b.dense_features[:, col], b.weights, strict=True) if w == 1]

    plain = order(ParquetBatches(out, "train", prepared, batch_size=5))
    a = ParquetBatches(out, "train", prepared, batch_size=5, shuffle=True, seed=3)
    first = order(a)
    assert first == order(a) == order(ParquetBatches(out, "train", prepared, batch_size=5, shuffle=True, seed=3))
    assert sorted(first) == sorted(plain) and first != plain
    a.set_epoch(1)
    second = order(a)
    assert second != first and sorted(second) == sorted(first)
    assert order(ParquetBatches(out, "train", prepared, batch_size=5, shuffle=True, seed=4)) != first
    # shuffled ranks still split the rows without overlap
    ranks = [order(ParquetBatches(out, "train", prepared, batch_size=5, rank=r, world_size=2, shuffle=True,
                                  seed=3)) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1]) and sorted(ranks[0] + ranks[1]) == sorted(plain)


@pytest.mark.parametrize("shuffle", [False, True])
def test_unlabeled_rows_join_training_without_their_labels(tiny_prepared, shuffle):
    """data.unlabeled_splits: every train and valid row exactly once over the ranks, each valid row with label 0
    and LABELED 0, each train row as stored with LABELED 1; padding rows count as neither."""
    from recsys.data.batch import LABELED
    from recsys.data.loader import ParquetBatches

    ds, out, prepared = tiny_prepared
    train, valid = _parquet_rows(out, "train"), _parquet_rows(out, "valid")
    assert not train.keys() & valid.keys()
    seen: dict[int, float] = {}
    n_batches = []
    for rank in range(2):
        loader = ParquetBatches(out, "train", prepared, batch_size=6, rank=rank, world_size=2, shuffle=shuffle,
                                seed=1, unlabeled=("valid",))
        batches = list(loader)
        assert len(batches) == len(loader)
        n_batches.append(len(batches))
        for b in batches:
            labeled = b.extras[LABELED].numpy()
            assert (labeled[b.weights.numpy() == 0] == 0).all()
            for row, flag in zip(_rows_of(b, DENSE_ORDER), labeled[b.weights.numpy() == 1], strict=True):
                row_no = int(row["row_no"])
                assert row_no not in seen
                seen[row_no] = flag
                if flag == 1:
                    assert row == train[row_no]
                else:
                    assert row == {**valid[row_no], "label": 0.0}  # the label never leaves the file
    assert n_batches[0] == n_batches[1]
    assert {r for r, f in seen.items() if f == 1} == set(train) and {r for r, f in seen.items() if f == 0} == set(valid)
    # without unlabeled splits the batches carry no LABELED column (a plain split is all labeled)
    assert LABELED not in next(iter(ParquetBatches(out, "train", prepared, batch_size=6))).extras


def test_unlabeled_rows_count_towards_min_count(tiny_prepared):
    """An id that only the unlabeled rows hold reads its own row there; nothing the training rows map to its
    own row changes, and an unlabeled lookup is never coarser than the plain one."""
    from recsys.data.loader import embedding_lookup

    ds, out, prepared = tiny_prepared
    # the tiny split's ids occur 7-45 times in training rows and histories: a high min_count makes some rare
    plain = embedding_lookup(out, prepared, 10)
    more = embedding_lookup(out, prepared, 10, ("valid", "test"))
    valid = read_split(out, "valid")
    changed = 0
    for f in prepared.sparse_fields:
        a, b = plain[f.table], more[f.table]
        own = a == np.arange(len(a))
        assert (b[own] == a[own]).all() and set(np.unique(b[~own])) <= set(np.flatnonzero(~own)) | {UNK_ID}
        assert (a[b] == a).all()  # the plain lookup recovers from the other: what ELEC's teacher relies on
        changed += int((a != b).sum())
    assert changed > 0
    users = valid["user_id"].to_numpy()
    assert (plain["user_id"][users] == UNK_ID).any() and (more["user_id"][users] != UNK_ID).any()
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        embedding_lookup(out, prepared, 2, ("nope",))


def test_loader_rejects_bad_arguments(tiny_prepared, tmp_path):
    from recsys.data.loader import ParquetBatches

    ds, out, prepared = tiny_prepared
    with pytest.raises(ValueError, match="rank 2 is outside world size 2"):
        ParquetBatches(out, "train", prepared, batch_size=4, rank=2, world_size=2)
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        ParquetBatches(out, "nope", prepared, batch_size=4)
    with pytest.raises(FileNotFoundError, match="unlabeled split 'nope'"):
        ParquetBatches(out, "train", prepared, batch_size=4, unlabeled=("nope",))
    with pytest.raises(ValueError, match="must differ"):
        ParquetBatches(out, "train", prepared, batch_size=4, unlabeled=("train",))
