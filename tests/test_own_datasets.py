"""Bring your own dataset: ordinary CSV exports (quotes, newlines in values, a byte-order mark), 0/1 labels,
no user ids, text fields, normalised dense fields; and the mistakes a new user makes fail loudly."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from recsys.data.prepare import prepare
from recsys.data.schema import FieldKind, PreparedSchema, SchemaError, load_schema
from recsys.data.sources import DataError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "docs" / "examples" / "reviews.yaml"
CATEGORIES = ["kitchen", "garden", "toys"]


def write_reviews(folder: Path, n: int = 80, bom: bool = False, clicked: str = "01", late_prefix: str = "") -> Path:
    """A reviews.csv as a spreadsheet would export it: quoted titles with commas, reviews with newlines and
    doubled quotes, no user column. ``late_prefix`` is put before the product ids of the last fifth of the
    rows (validation and test, by time)."""
    rng = np.random.default_rng(0)
    lines = ["product,title,category,price,helpful_votes,clicked,review,time"]
    for r in range(n):
        p = int(rng.integers(0, 12))
        review = f'Line one of {r}, with a comma.\nLine two says ""great"".' if r % 3 == 0 else f"plain {r}"
        product = f"{late_prefix if r >= n * 0.8 else ''}{1000 + p}"
        lines.append(f'{product},"Product {p}, model {p % 4}",{CATEGORIES[p % 3]},{10 + p * 1.5},'
                     f'{int(rng.integers(0, 50))},{clicked[int(rng.integers(0, len(clicked)))]},"{review}",'
                     f"{1_690_000_000 + r * 60}")
    folder.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    (folder / "reviews.csv").write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return folder


def _schema(folder: Path, change=None) -> Path:
    data = yaml.safe_load(EXAMPLE.read_text())
    data["source"]["root"] = "."
    if change:
        change(data)
    path = folder / "reviews.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_the_shipped_example_prepares_a_quoted_csv_without_user_ids(tmp_path):
    raw = write_reviews(tmp_path / "raw")
    prepared = prepare(load_schema(_schema(raw)), tmp_path / "out", progress=False)
    rows = sum(prepared.counts.values())
    assert rows == 80  # every quoted row read, commas and newlines inside quotes included
    assert prepared.split_method == "time"
    assert 0 < prepared.stats["positive_rate"]["train"] < 1  # the binary rule: 1 is a click
    df = pq.read_table(tmp_path / "out" / "train.parquet").to_pandas()
    reviews = df["review"].tolist()
    assert any(r.startswith("Line one of") and "\nLine two says \"great\"." in r for r in reviews)
    assert "user_id" not in df.columns and "user_train_rows" not in df.columns and "item_train_rows" in df.columns
    titles = {f.name: f for f in prepared.fields}
    assert titles["title"].kind is FieldKind.TEXT and titles["title"].vocab_file is None
    assert prepared.text_fields and all(f.kind is not FieldKind.TEXT for f in prepared.sparse_fields)


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    raw = write_reviews(tmp_path / "raw", bom=True)
    plain = write_reviews(tmp_path / "plain")
    a = prepare(load_schema(_schema(raw)), tmp_path / "a", progress=False)
    b = prepare(load_schema(_schema(plain)), tmp_path / "b", progress=False)
    for split in ("valid", "test"):
        assert pq.read_table(tmp_path / "a" / f"{split}.parquet").equals(
            pq.read_table(tmp_path / "b" / f"{split}.parquet"))
    assert a.stats["unknown_values"] == b.stats["unknown_values"]


def test_ids_that_are_all_unknown_outside_training_are_an_error(tmp_path):
    # the last rows (valid and test, by time) spell their products another way: "P1003" instead of 1003
    raw = write_reviews(tmp_path / "raw", late_prefix="P")
    with pytest.raises(DataError, match=r"field 'item_id': every one of the .* validation and test values is "
                                         r"unknown"):
        prepare(load_schema(_schema(raw)), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_0_1_label_under_the_rating_rule_is_an_error_that_names_the_rule(tmp_path):
    raw = write_reviews(tmp_path / "raw")
    schema = _schema(raw, lambda d: d.update(label={"column": "clicked"}))
    with pytest.raises(DataError, match=r"the train split has one class .*above 3 are clicks.*"
                                         r"`label: \{column: clicked, binary: true\}`"):
        prepare(load_schema(schema), tmp_path / "out", progress=False)


def test_a_refused_output_folder_leaves_nothing_behind(tmp_path):
    raw = write_reviews(tmp_path / "raw")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("not a dataset")
    with pytest.raises(DataError, match="is not a prepared dataset: refusing to replace it"):
        prepare(load_schema(_schema(raw)), out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "raw"]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_renamed_timestamp_column_is_named_in_errors(tmp_path):
    raw = write_reviews(tmp_path / "raw")
    lines = (raw / "reviews.csv").read_text().split("\n")
    i = next(i for i, line in enumerate(lines) if ',"plain 4",' in line)  # after two rows of two lines each
    lines[i] = lines[i].rsplit(",", 1)[0] + ",noon"
    (raw / "reviews.csv").write_text("\n".join(lines))
    assert i + 1 == 8
    with pytest.raises(DataError, match=r"reviews\.csv, line 8, column 'time': 'noon' is not a timestamp"):
        prepare(load_schema(_schema(raw)), tmp_path / "out", progress=False)


def test_line_numbers_count_newlines_inside_quoted_values(tmp_path):
    raw = write_reviews(tmp_path / "raw")
    lines = (raw / "reviews.csv").read_text().split("\n")
    # row 61: 21 rows with two-line reviews come before it, so it is on file line 1 + 61 + 21 + 1 = 84
    bad = next(i for i, line in enumerate(lines) if ',"plain 61",' in line)
    assert bad + 1 == 84
    head, votes, _clicked, review, time = lines[bad].rsplit(",", 4)
    lines[bad] = ",".join([head, votes, "7", review, time])
    (raw / "reviews.csv").write_text("\n".join(lines))
    with pytest.raises(DataError, match=rf"reviews\.csv, line {bad + 1}, column 'clicked': 7 is not 0 or 1"):
        prepare(load_schema(_schema(raw)), tmp_path / "out", progress=False)


def test_sequence_fields_need_user_ids(tmp_path):
    raw = write_reviews(tmp_path / "raw")
    schema = _schema(raw, lambda d: d["fields"].append(
        {"name": "hist", "kind": "sequence", "entity": "user", "history": "item_id", "share_vocab": "item_id",
         "description": "earlier products"}))
    with pytest.raises(SchemaError, match=r"sequence fields \['hist'\] are users' histories, and "
                                          r"source\.user_column is null"):
        load_schema(schema)


def test_dense_fields_are_normalised_on_the_training_rows(tmp_path):
    raw = write_reviews(tmp_path / "raw")
    prepared = prepare(load_schema(_schema(raw)), tmp_path / "out", progress=False)
    price = prepared.field("price")
    assert price.transform["kind"] == "log1p_standard"
    train = pq.read_table(tmp_path / "out" / "train.parquet").column("price").to_numpy()
    assert abs(train.mean()) < 1e-5 and abs(train.std() - 1) < 1e-4  # fitted on train
    votes = pq.read_table(tmp_path / "out" / "train.parquet").column("helpful_votes").to_numpy()
    assert votes.max() <= np.log1p(50) + 1e-6
    # schema.json keeps what was fitted, so raw values served later can be transformed alike
    again = PreparedSchema.load(tmp_path / "out").field("price").transform
    assert set(again) == {"kind", "mean", "std"}


def test_a_text_field_reaches_the_item_texts_of_the_embedding_job(tmp_path):
    from embedding_jobs.prepared import PreparedData
    from embedding_jobs.templates import TemplateOptions, item_texts

    raw = write_reviews(tmp_path / "raw")
    prepare(load_schema(_schema(raw)), tmp_path / "out", progress=False)
    data = PreparedData.open(tmp_path / "out")
    items = item_texts(data, TemplateOptions(user_key_field="item_id"))
    assert any("The product's title is Product" in t and ", model " in t for t in items.texts), items.texts[:3]


def test_a_dataset_without_user_ids_trains(tmp_path):
    from recsys.experiment import build_trainer, load_config

    raw = write_reviews(tmp_path / "raw", n=200)
    prepare(load_schema(_schema(raw)), tmp_path / "out", progress=False)
    cfg = load_config(None, [f"data.path={tmp_path / 'out'}", f"train.out_dir={tmp_path}", "name=r",
                             "data.batch_size=32", "data.eval_batch_size=64", "model.embedding_dim=8",
                             "train.progress=false", "train.epochs=1"])
    result = build_trainer(cfg).fit()
    assert result["test_rows"] > 0 and "cold_user" not in result["test_regimes"]
    shutil.rmtree(tmp_path / "r")


def test_training_says_the_validation_split_has_one_class(tmp_path, capsys):
    import pyarrow as pa

    from recsys.train.__main__ import main

    raw = write_reviews(tmp_path / "raw", n=200)
    out = tmp_path / "out"
    prepare(load_schema(_schema(raw)), out, progress=False)
    valid = pq.read_table(out / "valid.parquet")  # as if the label rule had made every row a click
    valid = valid.set_column(valid.column_names.index("label"), "label", pa.array(np.ones(valid.num_rows, np.float32)))
    pq.write_table(valid, out / "valid.parquet")
    code = main([f"data.path={out}", f"train.out_dir={tmp_path}", "name=r", "data.batch_size=32",
                 "data.eval_batch_size=64", "model.embedding_dim=8", "train.progress=false", "train.epochs=1"])
    assert code == 1
    assert "the validation split has one class (positive rate 100%)" in capsys.readouterr().err
