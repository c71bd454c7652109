"""The LLaCTR loss-weight sweep's search: which cells it trains, which it chooses, and how records merge."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.llactr_sweep import GRID, best, merge, search, table_sha256
from recsys.data.schema import PreparedSchema
from tests.synthetic_tables import random_method_tables


def surface(lo: float, ll: float) -> float:
    """A smooth validation-AUC surface with its peak at (0.3, 0.05), one cell off the coordinate search's start."""
    return 0.8 - (lo - 0.3) ** 2 - (ll - 0.05) ** 2


def test_grid_trains_every_cell_and_chooses_the_best():
    cells = search(surface, GRID, GRID, "grid", 0.1)
    assert len(cells) == 36
    assert best(cells)[:2] == (0.3, 0.05)


def test_coordinate_search_trains_eleven_distinct_cells_and_finds_a_separable_peak():
    seen = []

    def evaluate(lo, ll):
        seen.append((lo, ll))
        return surface(lo, ll)

    cells = search(evaluate, GRID, GRID, "coordinate", 0.1)
    assert len(seen) == len(set(seen)) == len(cells) == 11  # the start cell is not trained twice
    assert {ll for lo, ll in seen[:6]} == {0.1}  # first lambda_loss at the start, then lambda_llm at the best
    assert {lo for lo, ll in seen[6:]} == {0.3}
    assert best(cells)[:2] == (0.3, 0.05)


def record(**kw):
    r = {"data": "ml-100k", "seed": 1, "field_table": "t", "field_table_sha256": "aa", "fre_reduction": "sum",
         "adaptor": "full",
         "lambda_loss": GRID, "lambda_llm": GRID, "command": "first", "backbones": {"deepfm": {"chosen": {}}}}
    return {**r, **kw}


def test_a_rerun_adds_its_backbones_to_the_record_and_keeps_each_ones_command():
    merged = merge(record(), record(command="second", backbones={"fm": {"command": "second", "chosen": {}}}))
    assert set(merged["backbones"]) == {"deepfm", "fm"}
    assert merged["backbones"]["deepfm"]["command"] == "first"
    assert merged["backbones"]["fm"]["command"] == "second"


def test_a_sweep_with_other_settings_is_refused_naming_them():
    with pytest.raises(SystemExit, match="seed"):
        merge(record(), record(seed=2))


def test_a_table_rebuilt_with_other_vectors_under_the_same_path_is_refused(tiny_prepared, tmp_path):
    _, data, _ = tiny_prepared
    table = random_method_tables(tmp_path / "t", PreparedSchema.load(data), dim=8)["field"]
    digest = table_sha256(table)
    assert table_sha256(table) == digest
    t = pq.read_table(table)
    vectors = t.column("embedding").to_pylist()
    vectors[0] = [x + 1e-3 for x in vectors[0]]  # one field's vector moves a little
    moved = pa.array(vectors, type=pa.list_(pa.float32(), len(vectors[0])))
    pq.write_table(t.set_column(1, "embedding", moved).replace_schema_metadata(t.schema.metadata), table)
    assert table_sha256(table) != digest
    swept = record(backbones={"deepfm": {"chosen": {}, "field_table_sha256": digest}})
    with pytest.raises(SystemExit, match="deepfm were swept on"):
        merge(swept, record(field_table_sha256=table_sha256(table), backbones={"fm": {"chosen": {}}}))
    # the backbone itself swept again on the new table replaces its old entry
    merge(swept, record(field_table_sha256=table_sha256(table), backbones={"deepfm": {"chosen": {}}}))


def test_backbones_swept_before_the_table_was_hashed_are_kept():
    old = record(backbones={"deepfm": {"chosen": {}, "command": "first"}})
    del old["field_table_sha256"]
    merged = merge(old, record(backbones={"fm": {"chosen": {}, "field_table_sha256": "aa"}}))
    assert "field_table_sha256" not in merged["backbones"]["deepfm"] and merged["field_table_sha256"] == "aa"

