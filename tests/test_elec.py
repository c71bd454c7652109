"""ELEC: the distillation losses by hand, the gain network, two-stage and joint students on ML-100K with
synthetic user/item tables, and the exported student scoring where transformers and vLLM cannot import."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from synthetic_tables import write_synthetic_table

from recsys.data.prepare import prepare
from recsys.data.schema import PreparedSchema, load_schema
from recsys.features.table import FeatureEntity
from recsys.methods.elec import LMVectors, representation_distillation, score_distillation

REPO = Path(__file__).resolve().parents[1]


def test_lm_vectors_are_standardised_and_projected_at_the_chosen_scale():
    torch.manual_seed(0)
    vectors = 5.0 + 3.0 * torch.randn(2000, 64)
    mask = torch.ones(2000, dtype=torch.bool)
    mask[:2] = False  # padding and unknown: no vector
    for std, expected in ((0.0, None), (0.02, 0.02)):
        lm = LMVectors({"user_id": vectors}, {"user_id": mask}, dim=16, projection_std=std)
        standard = lm.vectors_0
        assert torch.equal(standard[:2], torch.zeros(2, 64))
        assert standard[2:].mean().abs() < 1e-4 and (standard[2:].std(0) - 1).abs().max() < 1e-3
        out = lm.projections[0](standard[2:])
        if expected is None:  # PyTorch's default Linear init: uniform(+-1/sqrt(d)) -> std sqrt(d/(3d)) ~ 0.58
            assert 0.45 < out.std().item() < 0.7
        else:
            assert out.std().item() == pytest.approx(expected, rel=0.15)


def test_score_distillation_matches_hand_computed_cases():
    student, teacher = torch.tensor([0.0]), torch.tensor([math.log(3.0)])  # q = 0.5, p = 0.75
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert score_distillation(student, teacher, "kl", 1.0).item() == pytest.approx(kl, abs=1e-6)
    p = 1 / (1 + math.exp(-math.log(3.0) / 2))  # temperature 2 softens the teacher; the student stays 0.5
    kl2 = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    assert score_distillation(student, teacher, "kl", 2.0).item() == pytest.approx(4 * kl2, abs=1e-6)
    assert score_distillation(teacher, teacher, "kl", 3.0).item() == pytest.approx(0.0, abs=1e-6)
    assert score_distillation(torch.tensor([1.0]), torch.tensor([3.0]), "mse").item() == pytest.approx(4.0)
    rep = representation_distillation(torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.0], [3.0, 1.0]]))
    assert rep.tolist() == pytest.approx([2.0, 5.0])


# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ml100k_tables(tmp_path_factory) -> tuple[Path, Path, Path]:
    """ML-100K with user/item tables whose first dimension is the id's training click rate (a real signal)."""
    root = tmp_path_factory.mktemp("elec")
    data = root / "ml-100k"
    prepare(load_schema("ml-100k"), data, progress=False)
    schema = PreparedSchema.load(data)
    train = pq.read_table(data / "train.parquet", columns=["user_id", "item_id", "label"]).to_pandas()
    rng = np.random.default_rng(0)
    paths = []
    for entity, key in ((FeatureEntity.USER, "user_id"), (FeatureEntity.ITEM, "item_id")):
        vectors = rng.standard_normal((schema.field(key).vocab_size, 6)).astype(np.float32) * 0.1
        rate = train.groupby(key)["label"].mean()
        vectors[rate.index.to_numpy(), 0] = rate.to_numpy()
        paths.append(write_synthetic_table(root / f"{entity}.parquet", schema, entity, vectors, key_field=key))
    return data, paths[0], paths[1]


def _cfg(data: Path, out: Path, name: str, *overrides: str):
    from recsys.experiment import load_config

    return load_config(None, [f"data.path={data}", f"train.out_dir={out}", f"name={name}", "data.batch_size=2048",
                              "model.deepfm.hidden=[32,32]", "train.progress=false", "train.epochs=1",
                              "train.max_steps_per_epoch=12", "train.seed=5", *overrides])


def _tables(user: Path, item: Path) -> list[str]:
    return [f"method.elec.user_table={user}", f"method.elec.item_table={item}"]


@pytest.fixture(scope="module")
def gain_run(ml100k_tables, tmp_path_factory) -> tuple[Path, dict]:
    from recsys.experiment import build_trainer

    data, user, item = ml100k_tables
    out = tmp_path_factory.mktemp("gain")
    result = build_trainer(_cfg(data, out, "gain", "method.name=elec_gain", *_tables(user, item))).fit()
    return out / "gain", result


def test_gain_network_sees_the_language_model_vectors(ml100k_tables, gain_run, tmp_path):
    from recsys.experiment import build_task

    data, user, item = ml100k_tables
    run, result = gain_run
    assert result["test_auc"] > 0.6
    schema = PreparedSchema.load(data)
    task = build_task(schema, _cfg(data, tmp_path, "g", "method.name=elec_gain", "method.elec.inject=fields",
                                   *_tables(user, item)), device=torch.device("cpu"))
    assert task.model.num_extra_fields == 2 and task.lm.fields == ["user_id", "item_id"] and task.late is None
    late = build_task(schema, _cfg(data, tmp_path, "g", "method.name=elec_gain", *_tables(user, item)),
                      device=torch.device("cpu"))  # the default: late fusion
    assert late.model.num_extra_fields == 0 and late.late is not None


@pytest.mark.parametrize("inject", ["logit", "fields"])
def test_the_teachers_representation_carries_the_language_model(ml100k_tables, tmp_path, inject):
    """Representation distillation transfers only what the teacher's representation holds: with either
    injection it must change when the language-model vectors change (the rest of the row held fixed)."""
    from recsys.data.loader import ParquetBatches
    from recsys.experiment import build_task

    data, user, item = ml100k_tables
    schema = PreparedSchema.load(data)
    task = build_task(schema, _cfg(data, tmp_path, "g", "method.name=elec_gain", f"method.elec.inject={inject}",
                                   *_tables(user, item)), device=torch.device("cpu")).eval()
    batch = next(iter(ParquetBatches(data, "train", schema, 64, extra_columns=task.extra_columns)))
    with torch.no_grad():
        before = task.output(batch).representation
        assert before.shape[-1] == task.representation_dim
        for i in range(len(task.lm.fields)):
            buffer = getattr(task.lm, f"vectors_{i}")
            buffer.copy_(buffer.roll(1, dims=0))  # every id now has another id's vector
        after = task.output(batch).representation
    assert not torch.allclose(before, after)


def test_student_without_distillation_is_exactly_the_base_model(ml100k_tables, tmp_path):
    from recsys.experiment import build_trainer

    data, _, _ = ml100k_tables
    base = build_trainer(_cfg(data, tmp_path, "base")).fit()
    alone = build_trainer(_cfg(data, tmp_path, "alone", "method.name=elec_student", "method.elec.score_weight=0")).fit()
    assert alone["test_auc"] == base["test_auc"] and alone["test_logloss"] == base["test_logloss"]


def _teacher_state(run: Path, data: Path, ckpt: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The gain network's tensors as stored under ``prefix`` in checkpoint ``ckpt``, gathered on CPU."""
    from recsys.experiment import build_task, load_config
    from recsys.train.checkpoint import load_part

    task = build_task(PreparedSchema.load(data), load_config(run / "config.yaml"), device=torch.device("cpu"))
    load_part(ckpt, task, source_prefix=prefix)
    return {k: v.clone() for k, v in task.state_dict().items()}


def test_two_stage_student_learns_from_a_frozen_teacher(ml100k_tables, gain_run, tmp_path):
    from recsys.experiment import build_trainer

    data, _, _ = ml100k_tables
    run, _ = gain_run
    cfg = _cfg(data, tmp_path, "student", "method.name=elec_student", f"method.elec.teacher_run={run}",
               "method.elec.rep_weight=0.5", "method.elec.temperature=2")
    trainer = build_trainer(cfg)
    result = trainer.fit()
    assert result["test_auc"] > 0.6
    # the late-fusion teacher's representation is its backbone's plus the late branch's hidden layer
    task = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    assert task.rep_projection.out_features == task.teacher.representation_dim == (
        task.teacher.model.representation_dim + task.model.embedding_dim)
    before = _teacher_state(run, data, run / "checkpoints" / "best", "")
    after = _teacher_state(run, data, tmp_path / "student" / "checkpoints" / "last", "teacher.")
    assert before.keys() == after.keys()
    for k in before:  # the teacher was loaded from the gain run and never changed
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, msg=k)


def test_joint_distillation_never_pushes_gradients_into_the_teacher(ml100k_tables, tmp_path):
    from recsys.data.loader import ParquetBatches
    from recsys.experiment import build_task
    from recsys.train.task import weighted_bce

    data, user, item = ml100k_tables
    schema = PreparedSchema.load(data)
    cfg = _cfg(data, tmp_path, "j", "method.name=elec_student", "method.elec.mode=joint", "method.elec.rep_weight=1",
               "method.elec.inject=fields", "model.backbone=dcnv2", *_tables(user, item))
    torch.manual_seed(0)
    task = build_task(schema, cfg, device=torch.device("cpu"))
    assert isinstance(task.rep_projection, torch.nn.Linear)  # DCNv2's representation grows with the fields
    batch = next(iter(ParquetBatches(data, "train", schema, 256, extra_columns=task.extra_columns)))
    loss, _ = task(batch)
    with_distillation = torch.autograd.grad(loss, list(task.teacher.parameters()), allow_unused=True)
    own = weighted_bce(task.teacher.output(batch).logit, batch)
    alone = torch.autograd.grad(own, list(task.teacher.parameters()), allow_unused=True)
    for a, b in zip(with_distillation, alone, strict=True):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b)
    student_grads = torch.autograd.grad(task(batch)[0], [task.rep_projection.weight])
    assert student_grads[0].abs().sum() > 0


def test_joint_run_trains_both_networks(ml100k_tables, tmp_path):
    from recsys.experiment import build_trainer

    data, user, item = ml100k_tables
    result = build_trainer(_cfg(data, tmp_path, "joint", "method.name=elec_student", "method.elec.mode=joint",
                          "method.elec.score_loss=mse", *_tables(user, item))).fit()
    assert result["test_auc"] > 0.6


def test_bad_teacher_runs_fail_before_training(ml100k_tables, gain_run, tmp_path):
    from recsys.experiment import build_trainer
    from recsys.train.config import ConfigError

    data, _, _ = ml100k_tables
    run, _ = gain_run
    with pytest.raises(ConfigError, match="not a finished gain-network run"):
        build_trainer(_cfg(data, tmp_path, "s", "method.name=elec_student", f"method.elec.teacher_run={tmp_path}"))
    with pytest.raises(ConfigError, match="user_table and method.elec.item_table are both unset"):
        build_trainer(_cfg(data, tmp_path, "g", "method.name=elec_gain"))
    with pytest.raises(ConfigError, match="inject"):
        build_trainer(_cfg(data, tmp_path, "g", "method.name=elec_gain", "method.elec.inject=middle"))
    fake = tmp_path / "other"
    fake.mkdir()
    (fake / "checkpoints" / "best").mkdir(parents=True)
    (fake / "config.yaml").write_text((run / "config.yaml").read_text())
    metrics = json.loads((run / "test_metrics.json").read_text())
    (fake / "test_metrics.json").write_text(json.dumps({**metrics, "fingerprint": "another"}))
    with pytest.raises(ConfigError, match="fingerprint"):
        build_trainer(_cfg(data, tmp_path, "s", "method.name=elec_student", f"method.elec.teacher_run={fake}"))


# ------------------------------------------------------------------------------------------------
BLOCKED = ("transformers", "vllm", "peft", "embedding_jobs")


def test_exported_student_scores_without_any_language_model(ml100k_tables, gain_run, tmp_path):
    from recsys.experiment import build_trainer
    from recsys.serve import export_run

    data, _, _ = ml100k_tables
    run, _ = gain_run
    result = build_trainer(_cfg(data, tmp_path, "student", "method.name=elec_student",
                          f"method.elec.teacher_run={run}")).fit()
    export = export_run(tmp_path / "student", tmp_path / "export")
    assert json.loads((export / "export.json").read_text())["method"] == "elec_student"
    scores = tmp_path / "scores.parquet"
    code = (f"import sys\nfor m in {BLOCKED!r}: sys.modules[m] = None  # importing any of them now fails\n"
            "from recsys.serve.score import main\n"
            f"rc = main(['--model', {str(export)!r}, '--input', {str(data / 'test.parquet')!r}, "
            f"'--out', {str(scores)!r}, '--no-progress'])\n"
            f"assert not set(sys.modules) & {{'torch_geometric', 'sentence_transformers'}}\n"
            "sys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = pq.read_table(scores)
    assert out.num_rows == result["test_rows"]
    auc = float(proc.stdout.split("auc ")[1].split(",")[0])
    assert auc == pytest.approx(result["test_auc"], abs=1e-4)  # the served model is the trained student


def test_export_refuses_a_gain_network_and_bad_requests_are_named(ml100k_tables, gain_run, tmp_path):
    import pyarrow as pa

    from recsys.experiment import build_trainer
    from recsys.serve import export_run, load_exported
    from recsys.serve.score import RequestError, score_file
    from recsys.train.config import ConfigError

    data, _, _ = ml100k_tables
    run, _ = gain_run
    with pytest.raises(ConfigError, match="elec_gain"):
        export_run(run, tmp_path / "x")
    build_trainer(_cfg(data, tmp_path, "base", "train.max_steps_per_epoch=2")).fit()
    model = load_exported(export_run(tmp_path / "base", tmp_path / "export"))
    requests = pq.read_table(data / "test.parquet").slice(0, 50)
    ids = requests.column("item_id").to_numpy().copy()
    ids[7] = 10**6
    bad = requests.set_column(requests.column_names.index("item_id"), "item_id", pa.array(ids))
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(RequestError, match="'item_id' row 7 has id 1000000"):
        score_file(model, tmp_path / "bad.parquet", tmp_path / "s.parquet", progress=False)
    pq.write_table(requests.drop(["genres"]), tmp_path / "missing.parquet")
    with pytest.raises(RequestError, match="'genres' is missing"):
        score_file(model, tmp_path / "missing.parquet", tmp_path / "s.parquet", progress=False)
    with pytest.raises(FileNotFoundError, match="exported model"):
        load_exported(tmp_path)


def test_a_plain_model_can_teach_as_the_control(ml100k_tables, tmp_path):
    """Distillation from the base model itself: what the student gains without any language model."""
    from recsys.experiment import build_trainer
    from recsys.train.config import ConfigError

    data, _, _ = ml100k_tables
    build_trainer(_cfg(data, tmp_path, "base", "train.max_steps_per_epoch=4")).fit()
    trainer = build_trainer(_cfg(data, tmp_path, "s", "method.name=elec_student", f"method.elec.teacher_run={tmp_path / 'base'}",
                           "method.elec.rep_weight=1"))
    assert type(trainer.model.module.teacher).__name__ == "Task"
    assert trainer.fit()["test_auc"] > 0.6
    (tmp_path / "cfg.yaml").write_text((tmp_path / "base" / "config.yaml").read_text().replace("name: none",
                                                                                              "name: llactr"))
    with pytest.raises(ConfigError, match="a teacher is a gain network"):
        fake = tmp_path / "fake"
        (fake / "checkpoints" / "best").mkdir(parents=True)
        (fake / "config.yaml").write_text((tmp_path / "cfg.yaml").read_text())
        (fake / "test_metrics.json").write_text((tmp_path / "base" / "test_metrics.json").read_text())
        build_trainer(_cfg(data, tmp_path, "s2", "method.name=elec_student", f"method.elec.teacher_run={fake}"))


# ------------------------------------------------------------------------------------------------
# Distillation on unlabeled rows (data.unlabeled_splits)
# ------------------------------------------------------------------------------------------------
def test_with_unlabeled_rows_the_teacher_still_reads_its_own_runs_rows(ml100k_tables, gain_run, tmp_path):
    """The student looks the valid split's cold users up in their own rows; inside it, the frozen teacher must
    still score every row exactly as its own run did (reading <unk> for them), and BCE must never read an
    unlabeled row's label."""
    from recsys.data.batch import LABELED
    from recsys.data.loader import ParquetBatches, embedding_lookup
    from recsys.experiment import build_task, load_config
    from recsys.train.checkpoint import load_part
    from recsys.train.task import Task

    data, _, _ = ml100k_tables
    run, _ = gain_run
    schema = PreparedSchema.load(data)
    cfg = _cfg(data, tmp_path, "s", "method.name=elec_student", f"method.elec.teacher_run={run}",
               "data.unlabeled_splits=[valid]")
    cpu = torch.device("cpu")
    student = build_task(schema, cfg, device=cpu)
    load_part(run / "checkpoints" / "best", student, target_prefix="teacher.")
    gain = build_task(schema, load_config(run / "config.yaml"), device=cpu)
    load_part(run / "checkpoints" / "best", gain)
    columns = student.extra_columns
    mine = next(iter(ParquetBatches(data, "valid", schema, 512, extra_columns=columns,
                                    lookup=embedding_lookup(data, schema, 2, ["valid"]))))
    theirs = next(iter(ParquetBatches(data, "valid", schema, 512, extra_columns=columns,
                                      lookup=embedding_lookup(data, schema, 2))))
    # the lookups differ on these rows (cold users have their own rows now), so the check below means something
    assert not torch.equal(mine.sparse_features.values(), theirs.sparse_features.values())
    student.eval(), gain.eval()
    with torch.no_grad():
        torch.testing.assert_close(student._teacher(mine).logit, gain.output(theirs).logit, rtol=0, atol=0)
    assert student.learns_from_unlabeled and not gain.learns_from_unlabeled

    # BCE reads labeled rows only: an unlabeled row's label (0 in the batch) cannot move the loss
    batch = next(iter(ParquetBatches(data, "train", schema, 4096, shuffle=True, unlabeled=("valid",),
                                     extra_columns=columns)))
    unlabeled = batch.extras[LABELED] == 0
    assert unlabeled.any() and (batch.labels[unlabeled] == 0).all()
    plain = Task(student.model).eval()
    flipped = dataclasses.replace(batch, labels=torch.where(unlabeled, 1.0, batch.labels))
    with torch.no_grad():
        assert plain(batch)[0].item() == plain(flipped)[0].item()
        assert plain(flipped)[0].item() != plain(dataclasses.replace(flipped, extras={}))[0].item()


def test_a_student_distilled_on_unlabeled_rows_exports_what_it_reported(ml100k_tables, gain_run, tmp_path):
    from recsys.experiment import build_trainer
    from recsys.serve import export_run, load_exported
    from recsys.serve.score import score_file

    data, _, _ = ml100k_tables
    run, _ = gain_run
    result = build_trainer(_cfg(data, tmp_path, "student", "method.name=elec_student", f"method.elec.teacher_run={run}",
                                "data.unlabeled_splits=[valid]")).fit()
    assert result["test_auc"] > 0.6
    model = load_exported(export_run(tmp_path / "student", tmp_path / "export"))
    scored = score_file(model, data / "test.parquet", tmp_path / "scores.parquet", progress=False)
    # the export bakes the lookup of the run (cold users in valid read their own, distilled rows)
    assert scored["auc"] == pytest.approx(result["test_auc"], abs=1e-6)


def test_unlabeled_rows_are_refused_where_nothing_learns_from_them(ml100k_tables, gain_run, tmp_path):
    from recsys.experiment import build_trainer
    from recsys.train.config import ConfigError

    data, user, item = ml100k_tables
    run, _ = gain_run
    with pytest.raises(ConfigError, match="Task learns nothing from rows without labels"):
        build_trainer(_cfg(data, tmp_path, "a", "data.unlabeled_splits=[valid]"))
    for bad in (["method.elec.mode=joint", *_tables(user, item)], ["method.elec.score_weight=0"]):
        with pytest.raises(ConfigError, match="only a two-stage student with a distillation weight"):
            build_trainer(_cfg(data, tmp_path, "b", "method.name=elec_student", "data.unlabeled_splits=[valid]", *bad))
    with pytest.raises(ConfigError, match="name other splits than train"):
        build_trainer(_cfg(data, tmp_path, "c", "method.name=elec_student", f"method.elec.teacher_run={run}",
                           "data.unlabeled_splits=[train]"))


def test_the_benchmarks_students_distil_their_own_language_models_gain_network():
    """benchmarks.elec names each language model's runs with a suffix: a student that silently distilled another
    model's gain network (or the base) would make the MiniLM-against-SmolLM2 record compare the wrong runs."""
    from benchmarks.elec import LLMS, gain_of, variants
    from benchmarks.quality import run_name

    def teacher(overrides: list[str]) -> str | None:
        runs = [o.split("=", 1)[1] for o in overrides if o.startswith("method.elec.teacher_run=")]
        return runs[0].format(tag="ml100k", backbone="deepfm", seed=3) if runs else None

    shared = None
    for suffix in LLMS.values():
        vs = variants(Path("tables"), suffix)
        for name, overrides in vs.items():
            if name.startswith("elec_student") and name != "elec_student_alone":
                assert gain_of(name) == f"elec_gain{suffix}" and gain_of(name) in vs
                assert teacher(overrides) == f"runs/bench/{run_name('ml-100k', 'deepfm', 3, gain_of(name))}"
            if name.startswith("control"):
                assert teacher(overrides) == f"runs/bench/{run_name('ml-100k', 'deepfm', 3)}"
        # the runs without a language model are the same runs for every language model
        mine = {k: v for k, v in vs.items() if k == "base" or k.startswith("control") or k == "elec_student_alone"}
        assert shared in (None, mine)
        shared = mine
