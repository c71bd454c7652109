"""No checkpoint or export can run code or reach outside its folder, on every path that reads one: resume,
the final evaluation of the best checkpoint, a student's teacher (warm start), export, and scoring an export.

Each hostile file carries a pickle that would create a marker file when unpickled; a test passes only if the
read is refused with the file named and the marker never appears."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from recsys.experiment import load_config
from recsys.train.checkpoint import (
    CheckpointMismatchError,
    SafeReader,
    UnsafeCheckpointError,
    _load,
    _MetadataUnpickler,
    load_part,
    saved_tensors,
)


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _cfg(data: Path, out: Path, name: str, *overrides: str):
    return load_config(None, [f"data.path={data}", f"train.out_dir={out}", f"name={name}", "data.batch_size=16",
                              "data.eval_batch_size=16", "model.embedding_dim=8", "model.deepfm.hidden=[8]",
                              "train.progress=false", "train.epochs=1", "train.pipeline=false", *overrides])


@pytest.fixture(scope="module")
def finished_run(tiny_prepared, tmp_path_factory) -> tuple[Path, Path]:
    """A finished tiny DeepFM run (its folder and its prepared dataset)."""
    from recsys.experiment import build_trainer

    _, data, _ = tiny_prepared
    out = tmp_path_factory.mktemp("runs")
    build_trainer(_cfg(data, out, "base")).fit()
    return out / "base", data


@pytest.fixture
def hostile(finished_run, tmp_path) -> tuple[Path, Path, Path]:
    """A copy of the run whose checkpoints' ``.metadata`` would run code; and the marker it would create."""
    run, data = finished_run
    copy = tmp_path / "runs" / "base"
    shutil.copytree(run, copy)
    marker = tmp_path / "pwned"
    for ckpt in ("best", "last"):
        (copy / "checkpoints" / ckpt / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    return copy, data, marker


def test_a_real_checkpoint_still_loads(finished_run):
    from recsys.experiment import build_task

    run, data = finished_run
    names = saved_tensors(run / "checkpoints" / "last")
    assert any(k.startswith("optim.") for k in names) and "model.model.dnn.0.weight" in names
    from recsys.data.schema import PreparedSchema

    task = build_task(PreparedSchema.load(data), load_config(run / "config.yaml"), device=torch.device("cpu"))
    assert load_part(run / "checkpoints" / "best", task) == len(task.state_dict())


def test_resuming_another_models_checkpoint_names_what_differs(finished_run, tmp_path, capsys):
    from recsys.train.__main__ import main

    run, data = finished_run
    shutil.copytree(run, tmp_path / "base")
    before = sorted(p.name for p in (tmp_path / "base").rglob("*"))
    overrides = [f"data.path={data}", f"train.out_dir={tmp_path}", "name=base", "data.batch_size=16",
                 "data.eval_batch_size=16", "model.embedding_dim=8", "model.deepfm.hidden=[8,8]",  # one layer more
                 "train.progress=false", "train.epochs=2", "train.pipeline=false"]
    assert main(overrides) == 2
    err = capsys.readouterr().err
    assert "is not a checkpoint of this model" in err and "model.dnn.2.weight" in err, err
    assert sorted(p.name for p in (tmp_path / "base").rglob("*")) == before  # nothing written over


def test_warm_starting_from_another_embedding_size_names_the_tensors(finished_run):
    from recsys.data.schema import PreparedSchema
    from recsys.experiment import build_task

    run, data = finished_run
    cfg = load_config(run / "config.yaml", ["model.embedding_dim=4"])
    task = build_task(PreparedSchema.load(data), cfg, device=torch.device("cpu"))
    with pytest.raises(CheckpointMismatchError, match=r"has other shapes of \d+ tensor\(s\)") as e:
        load_part(run / "checkpoints" / "best", task)
    assert "embedding" in str(e.value) or "ebc" in str(e.value), e.value


def test_resume_refuses_hostile_metadata(hostile):
    from recsys.experiment import build_trainer

    run, data, marker = hostile
    trainer = build_trainer(_cfg(data, run.parent, "base", "train.epochs=2"))
    with pytest.raises(UnsafeCheckpointError, match=r"last/\.metadata.*posix.system|last/\.metadata.*os.system"):
        trainer.fit()
    assert not marker.exists()


def test_evaluating_the_best_checkpoint_refuses_hostile_metadata(hostile, finished_run):
    from recsys.experiment import build_trainer

    run, data, marker = hostile
    original, _ = finished_run
    shutil.rmtree(run / "checkpoints" / "last")  # a real last: the resume succeeds, then fit() tests best
    shutil.copytree(original / "checkpoints" / "last", run / "checkpoints" / "last")
    with pytest.raises(UnsafeCheckpointError, match=r"best/\.metadata"):
        build_trainer(_cfg(data, run.parent, "base")).fit()
    assert not marker.exists()


def test_a_hostile_teacher_is_refused(hostile, tmp_path):
    from recsys.experiment import build_trainer

    teacher, data, marker = hostile
    cfg = _cfg(data, tmp_path / "students", "student", "method.name=elec_student",
               f"method.elec.teacher_run={teacher}")
    with pytest.raises(UnsafeCheckpointError, match=r"best/\.metadata"):
        build_trainer(cfg)
    assert not marker.exists()


def test_export_refuses_a_hostile_run_and_the_cli_says_why(hostile, tmp_path, capsys):
    from recsys.serve.export import main

    run, _, marker = hostile
    assert main(["--run", str(run), "--out", str(tmp_path / "export")]) == 2
    assert "refusing checkpoint metadata" in capsys.readouterr().err and not marker.exists()
    assert not (tmp_path / "export").exists()


def test_the_training_cli_refuses_a_hostile_run(hostile, capsys):
    from recsys.train.__main__ import main

    run, data, marker = hostile
    overrides = [f"data.path={data}", f"train.out_dir={run.parent}", "name=base", "data.batch_size=16",
                 "data.eval_batch_size=16", "model.embedding_dim=8", "model.deepfm.hidden=[8]",
                 "train.progress=false", "train.epochs=2", "train.pipeline=false"]
    assert main(overrides) == 2
    assert "checkpoint refused" in capsys.readouterr().err and not marker.exists()


def test_scoring_refuses_an_export_that_holds_more_than_tensors(finished_run, tmp_path):
    from recsys.serve.artifact import export_run, load_exported

    run, _ = finished_run
    export = export_run(run, tmp_path / "export")
    load_exported(export)  # the real one loads
    marker = tmp_path / "pwned"
    torch.save({"weights": _Payload(marker)}, export / "model.pt")
    with pytest.raises(UnsafeCheckpointError, match="model.pt"):
        load_exported(export)
    assert not marker.exists()


def test_a_hostile_non_tensor_entry_is_refused(tmp_path):
    """DCP's own planner unpickles non-tensor entries with weights_only=False; ours does not."""
    marker = tmp_path / "pwned"
    dcp.save({"x": _Payload(marker), "w": torch.ones(3)}, checkpoint_id=str(tmp_path / "ckpt"))
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match="'x'"):
        _load({"x": 0, "w": torch.zeros(3)}, tmp_path / "ckpt")
    assert not marker.exists()
    state = {"w": torch.zeros(3)}
    _load(state, tmp_path / "ckpt", partial=True)  # plain tensors beside it still load
    assert torch.equal(state["w"], torch.ones(3))


def _rewrite_paths(ckpt: Path, relative_path: str) -> None:
    with open(ckpt / ".metadata", "rb") as f:
        metadata = _MetadataUnpickler(f).load()
    for info in metadata.storage_data.values():
        info.relative_path = relative_path
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlinked_file", "symlinked_folder"])
def test_checkpoint_files_stay_inside_their_folder(finished_run, tmp_path, how):
    run, _ = finished_run
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run / "checkpoints" / "best", ckpt)
    outside = tmp_path / "outside.distcp"
    shutil.copy(next(ckpt.glob("*.distcp")), outside)
    if how == "dotdot":
        _rewrite_paths(ckpt, "../outside.distcp")
    elif how == "absolute":
        _rewrite_paths(ckpt, str(outside))
    elif how == "symlinked_file":
        data = next(ckpt.glob("*.distcp"))
        data.unlink()
        data.symlink_to(outside)
    else:
        real = tmp_path / "elsewhere"
        ckpt.rename(real)
        ckpt.symlink_to(real)
    with pytest.raises(UnsafeCheckpointError, match="outside its folder|symbolic link"):
        SafeReader(str(ckpt)).read_metadata()
