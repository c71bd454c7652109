"""Interrupted jobs lose nothing: SIGKILL a job at random points of its run, rerun it, and the result equals an
uninterrupted run's (the embedding job, preparation, training).

The kill points are lines of project code drawn at random over the whole run (``tests/kill_at_line.py``), so
they land inside batches, between writing a file and renaming it, and in merges and checkpoints alike.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from fake_engine import run_fake

from recsys.data.prepare import prepare
from recsys.data.schema import load_schema
from recsys.features import load_feature_table

REPO = Path(__file__).resolve().parents[1]
KILLER = REPO / "tests" / "kill_at_line.py"
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}


def _run(kill_at: int, count_file: Path, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(KILLER), str(kill_at), str(count_file), *cmd], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600)


def _kill_points(tmp_path: Path, n: int, seed: int, *cmd: str) -> list[int]:
    """Run ``cmd`` once to count its lines, then draw ``n`` distinct points over all but its last 2%."""
    count_file = tmp_path / "lines"
    proc = _run(0, count_file, *cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    total = int(count_file.read_text())
    return sorted(np.random.default_rng(seed).choice(np.arange(1, int(total * 0.98)), n, replace=False).tolist())


def _killed(kill_at: int, tmp_path: Path, *cmd: str) -> None:
    proc = _run(kill_at, tmp_path / "unused", *cmd)
    assert proc.returncode == -signal.SIGKILL, f"not killed at line {kill_at}: {proc.stderr[-2000:]}"


# --- the embedding job -----------------------------------------------------------------------------------


ENTITIES = "field,feature,user,item"


def _tables(out: Path, schema) -> dict[str, dict[int, bytes]]:
    """Every finished table of a job's folder, key -> vector bytes, read through the checking loader."""
    tables = {}
    for meta in sorted(out.rglob("table.parquet")):
        folder = meta.parent
        entity = folder.relative_to(out).parts[0]  # field, feature/<table>, user, item
        load_feature_table(folder, expect_fingerprint=schema.fingerprint, expect_entity=entity)  # no duplicates
        t = pq.read_table(meta)
        keys = t.column("key").to_pylist()
        assert len(keys) == len(set(keys)), f"duplicate keys in {folder}"
        vectors = t.column("embedding").to_numpy(zero_copy_only=False)
        tables[str(folder.relative_to(out))] = {k: v.tobytes() for k, v in zip(keys, vectors, strict=True)}
    return tables


def test_embedding_job_killed_at_20_points_then_rerun_equals_an_uninterrupted_run(tiny_prepared, tmp_path):
    _, prepared_dir, schema = tiny_prepared
    run_fake(tmp_path / "reference", prepared_dir, ENTITIES)
    reference = _tables(tmp_path / "reference", schema)
    assert len(reference) >= 4

    job = lambda out: ("fake_engine", str(prepared_dir), str(out), ENTITIES)  # noqa: E731
    points = _kill_points(tmp_path, 20, 0, *job(tmp_path / "counted"))
    assert _tables(tmp_path / "counted", schema) == reference  # the traced run is an ordinary run
    for point in points:
        out = tmp_path / f"killed-{point}"
        _killed(point, tmp_path, *job(out))
        result, _ = run_fake(out, prepared_dir, ENTITIES)  # the rerun
        assert all(t.merged for t in result.tables), point
        assert _tables(out, schema) == reference, f"killed at line {point}"


# --- preparation -----------------------------------------------------------------------------------------


def _prepared_files(folder: Path) -> dict[str, object]:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = str(path.relative_to(folder))
        files[name] = pq.read_table(path).to_pylist() if path.suffix == ".parquet" else path.read_bytes()
    return files


def test_preparation_killed_at_random_points_then_rerun_equals_an_uninterrupted_run(tiny, tmp_path):
    prepare(load_schema(tiny.schema_path), tmp_path / "reference", progress=False)
    reference = _prepared_files(tmp_path / "reference")
    cmd = lambda out: ("recsys.prepare", "--dataset", str(tiny.schema_path), "--out", str(out), "--no-progress")  # noqa: E731
    for point in _kill_points(tmp_path, 8, 1, *cmd(tmp_path / "counted")):
        out = tmp_path / f"killed-{point}"
        _killed(point, tmp_path, *cmd(out))
        prepare(load_schema(tiny.schema_path), out, progress=False)
        assert _prepared_files(out) == reference, f"killed at line {point}"
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        assert not leftovers, f"killed at line {point}: {leftovers} left beside the dataset"


# --- training ----------------------------------------------------------------------------------------------


TRAIN = ("name=t", "data.batch_size=16", "data.eval_batch_size=32", "model.deepfm.hidden=[8]",
         "train.progress=false", "train.epochs=3", "train.patience=5")


def test_training_killed_at_random_steps_then_resumed_equals_an_uninterrupted_run(tiny_prepared, tmp_path):
    _, prepared_dir, _ = tiny_prepared
    cmd = lambda out: ("recsys.train", f"data.path={prepared_dir}", f"train.out_dir={out}", *TRAIN)  # noqa: E731
    points = _kill_points(tmp_path, 4, 2, *cmd(tmp_path / "reference"))
    reference = json.loads((tmp_path / "reference" / "t" / "test_metrics.json").read_text())
    resumed_runs = 0
    for point in points:
        out = tmp_path / f"killed-{point}"
        _killed(point, tmp_path, *cmd(out))
        proc = subprocess.run([sys.executable, "-m", *cmd(out)], cwd=REPO, env=ENV, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"killed at line {point}: {proc.stderr[-3000:]}"
        resumed_runs += "resumed from" in proc.stdout + proc.stderr
        resumed = json.loads((out / "t" / "test_metrics.json").read_text())
        for key in ("valid_auc", "valid_logloss", "test_auc", "test_logloss", "best_epoch"):
            assert resumed.get(key) == reference.get(key), f"killed at line {point}: {key}"
        history = json.loads((out / "t" / "metrics.json").read_text())["history"]
        assert [h["epoch"] for h in history] == list(range(len(history))), f"killed at line {point}"
    assert resumed_runs, "no kill point came after a checkpoint: the resume path was not exercised"
