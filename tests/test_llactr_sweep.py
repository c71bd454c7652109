"""The LLaCTR loss-weight sweep's search: which cells it trains, which it chooses, and how records merge."""

import pytest

from benchmarks.llactr_sweep import GRID, best, merge, search


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
    r = {"data": "ml-100k", "seed": 1, "field_table": "t", "fre_reduction": "sum", "adaptor": "full",
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
