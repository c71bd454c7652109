"""The random-vector controls: same keys and metadata as the language model's table, no text in the vectors."""

import sys

import numpy as np
import pytest

from recsys.data.schema import PreparedSchema
from recsys.features.reader import read_file
from tests.synthetic_tables import random_method_tables


@pytest.mark.parametrize("entity", ["field", "user", "item"])
def test_a_control_keeps_keys_fingerprint_and_scale_and_redraws_the_directions(tiny_prepared, tmp_path, monkeypatch,
                                                                             entity):
    from benchmarks import random_field_table

    _, data, _ = tiny_prepared
    real = random_method_tables(tmp_path / "real", PreparedSchema.load(data), dim=16)[entity]
    monkeypatch.setattr(sys, "argv", ["random_field_table", "--like", str(real), "--out", str(tmp_path / "ctl"),
                                           "--seed", "7"])  # not the seed the real table was drawn with
    assert random_field_table.main() == 0
    meta, keys, vectors = read_file(real)
    cmeta, ckeys, cvectors = read_file(tmp_path / "ctl" / entity / "table.parquet")
    assert np.array_equal(keys, ckeys) and cmeta.entity == meta.entity
    assert cmeta.dataset_fingerprint == meta.dataset_fingerprint and cmeta.model_name == "random-control"
    norms, cnorms = np.linalg.norm(vectors, axis=1), np.linalg.norm(cvectors, axis=1)
    # a field table is L2-normalised like the real ones; a user or item table keeps each key's norm
    np.testing.assert_allclose(cnorms, 1.0 if entity == "field" else norms, rtol=1e-5)
    cosine = (vectors * cvectors).sum(axis=1) / (norms * cnorms)
    assert np.abs(cosine).max() < 0.99  # new directions, not the real vectors rescaled
