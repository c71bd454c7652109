"""LLaCTR's enhancements: the KL term by hand, FIE as a real pairwise term, and training with a field table."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic_tables import write_synthetic_table

from recsys.data.prepare import prepare
from recsys.data.schema import PreparedSchema, load_schema
from recsys.features.table import FeatureEntity
from recsys.methods.llactr import Adaptor, FieldInteraction, Reduction, field_kl


def test_field_kl_matches_a_hand_computed_case():
    field_proj = torch.tensor([[0.0, math.log(3.0)]])  # softmax -> [0.25, 0.75]
    emb = torch.tensor([[[0.0, 0.0]]])  # softmax -> [0.5, 0.5]
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert field_kl(field_proj, emb).item() == pytest.approx(expected, abs=1e-6)
    assert field_kl(field_proj, field_proj.unsqueeze(0)).item() == pytest.approx(0.0, abs=1e-7)


def test_the_reference_reduction_sums_over_fields_as_kl_div_batchmean_does():
    field_proj, emb = torch.randn(5, 8), torch.randn(32, 5, 8)
    summed = field_kl(field_proj, emb, Reduction.SUM)
    assert torch.allclose(summed, 5 * field_kl(field_proj, emb), atol=1e-6)  # K times the field mean
    reference = torch.nn.KLDivLoss(reduction="batchmean", log_target=True)(
        torch.log_softmax(emb, -1), torch.log_softmax(field_proj, -1).expand_as(emb))
    assert summed.mean().item() == pytest.approx(reference.item(), rel=1e-5)


def test_the_scalar_adaptor_is_an_affine_map_of_the_similarities():
    """adaptor=scalar: w = alpha s + beta, two parameters, so the pair weights can only follow the similarities."""
    fie = FieldInteraction(torch.randn(6, 4), adaptor=Adaptor.SCALAR)
    assert sum(p.numel() for p in fie.parameters()) == 2
    assert torch.allclose(fie.pair_weights(), fie.similarity)  # the identity at start, as the full adaptor
    with torch.no_grad():
        fie.adaptor.weight.fill_(-2.0)
        fie.adaptor.bias.fill_(0.5)
    assert torch.allclose(fie.pair_weights(), -2.0 * fie.similarity + 0.5)
    e = torch.randn(3, 6, 5)
    assert torch.allclose(fie(e), fie.eval()(e), atol=1e-5)  # training and serving forms agree


def test_fie_is_a_pairwise_term_that_changes_with_the_input():
    field_emb = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    fie = FieldInteraction(field_emb)
    s = 1 / math.sqrt(2)
    assert torch.allclose(fie.similarity, torch.tensor([s, 0.0, s]))  # pairs (0,1), (0,2), (1,2)
    e = torch.randn(4, 3, 5)
    expected = s * (e[:, 0] * e[:, 1]).sum(-1) + s * (e[:, 1] * e[:, 2]).sum(-1)  # identity adaptor at start
    assert torch.allclose(fie(e), expected, atol=1e-6)
    assert not torch.allclose(fie(e), fie(torch.randn(4, 3, 5)))
    fie.eval()  # serving caches the pair matrix; it must give the same term, and be rebuilt after training
    assert torch.allclose(fie(e), expected, atol=1e-6)
    with torch.no_grad():
        fie.adaptor.bias.fill_(1.0)
    fie.train()
    fie.eval()
    assert not torch.allclose(fie(e), expected, atol=1e-6)


def test_fie_training_and_serving_forms_agree_in_value_and_gradient():
    """Training computes <Gram(e), W>, serving sum(e * W e): the same term, and the same gradients as the
    plain double loop over pairs (scale = lambda_llm included)."""
    torch.manual_seed(0)
    fie = FieldInteraction(torch.randn(5, 7), scale=0.3)
    with torch.no_grad():
        fie.adaptor.weight.add_(0.1 * torch.randn_like(fie.adaptor.weight))
        fie.adaptor.bias.normal_()
    e = torch.randn(6, 5, 4, requires_grad=True)
    w = fie.pair_weights()
    loop = 0.3 * sum(w[p] * (e[:, i] * e[:, j]).sum(-1) for p, (i, j) in enumerate(zip(fie.left, fie.right, strict=True)))
    grads_loop = torch.autograd.grad(loop.sum(), [e, fie.adaptor.weight])
    term = fie.train()(e)
    assert torch.allclose(term, loop, atol=1e-5)
    grads = torch.autograd.grad(term.sum(), [e, fie.adaptor.weight])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, grads_loop, strict=True))
    with torch.no_grad():
        assert torch.allclose(fie.eval()(e), loop, atol=1e-5)
        other = FieldInteraction(torch.randn(5, 7), scale=0.3).eval()
        other(e)  # caches its serving matrix; loading weights in eval mode must replace it
        other.load_state_dict(fie.state_dict())
        assert torch.allclose(other(e), loop, atol=1e-5)


@pytest.fixture(scope="module")
def ml100k_with_field_table(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("llactr")
    data = root / "ml-100k"
    prepare(load_schema("ml-100k"), data, progress=False)
    schema = PreparedSchema.load(data)
    vectors = np.random.default_rng(0).standard_normal((len(schema.fields), 8))
    table = write_synthetic_table(root / "fields.parquet", schema, FeatureEntity.FIELD, vectors, model_name="test-fields")
    return data, table


def _cfg(data: Path, out: Path, *overrides: str):
    from recsys.experiment import load_config

    return load_config(None, [f"data.path={data}", f"train.out_dir={out}", "name=l", "data.batch_size=2048",
                              "model.deepfm.hidden=[64,64]", "train.progress=false", "train.epochs=1",
                              "train.max_steps_per_epoch=10", *overrides])


@pytest.mark.parametrize("backbone, options", [("deepfm", ()), ("dcnv2", ("method.llactr.adaptor=scalar",
                                                                        "method.llactr.fre_reduction=sum"))])
def test_llactr_trains_on_any_backbone_with_one_config_change(ml100k_with_field_table, tmp_path, backbone, options):
    from recsys.experiment import build_trainer

    data, table = ml100k_with_field_table
    trainer = build_trainer(_cfg(data, tmp_path, f"model.backbone={backbone}", "method.name=llactr",
                           f"method.llactr.field_table={table}", *options))
    result = trainer.fit()
    assert 0.6 < result["test_auc"] < 1.0
    names = {n for n, _ in trainer.model.named_parameters()}
    assert any("interaction.adaptor" in n for n in names) and any("projection" in n for n in names)


def test_centering_removes_a_direction_every_field_vector_shares(ml100k_with_field_table, tmp_path):
    """method.llactr.center_fields: a table whose vectors all carry one large common component (a decoder's
    anisotropy) has near-constant similarities; centred, it gives the same similarities as the table without
    that component, centred."""
    from recsys.experiment import build_task

    data, table = ml100k_with_field_table
    schema = PreparedSchema.load(data)
    vectors = np.random.default_rng(0).standard_normal((len(schema.fields), 8))
    shifted = write_synthetic_table(tmp_path / "shifted.parquet", schema, FeatureEntity.FIELD, vectors + 50.0,
                                    model_name="test-fields")

    def similarity(path: Path, center: bool) -> torch.Tensor:
        task = build_task(schema, _cfg(data, tmp_path, "method.name=llactr", f"method.llactr.field_table={path}",
                                       f"method.llactr.center_fields={str(center).lower()}"))
        return task.interaction.similarity

    assert similarity(shifted, False).min() > 0.99  # raw: every pair looks alike
    centred = similarity(shifted, True)
    assert torch.allclose(centred, similarity(table, True), atol=1e-4)
    assert centred.std() > 0.2 and not torch.allclose(centred, similarity(table, False), atol=1e-2)


def test_field_table_of_another_dataset_is_refused(ml100k_with_field_table, tmp_path):
    from recsys.experiment import build_task
    from recsys.features.table import FeatureTableError

    data, table = ml100k_with_field_table
    schema = PreparedSchema.load(data)
    other = PreparedSchema(**{**schema.__dict__, "fingerprint": "another"})
    with pytest.raises(FeatureTableError, match="fingerprint"):
        build_task(other, _cfg(data, tmp_path, "method.name=llactr", f"method.llactr.field_table={table}"))


def test_missing_field_table_fails_before_training(ml100k_with_field_table, tmp_path):
    from recsys.experiment import build_trainer
    from recsys.train.config import ConfigError

    data, table = ml100k_with_field_table
    with pytest.raises(ConfigError, match="adaptor"):
        build_trainer(_cfg(data, tmp_path, "method.name=llactr", f"method.llactr.field_table={table}",
                           "method.llactr.adaptor=diagonal"))
    with pytest.raises(ConfigError, match="embedding_jobs.run --entity field"):
        build_trainer(_cfg(data, tmp_path, "method.name=llactr", f"method.llactr.field_table={tmp_path / 'none'}"))


def test_field_similarity_record_reads_the_tables_in_schema_order(ml100k_with_field_table, tmp_path, monkeypatch):
    """benchmarks.field_similarity: one symmetric matrix per table with a unit diagonal, pair (i, j) the cosine
    of fields i and j as the schema orders them; a table of another dataset is refused."""
    import json
    import sys

    from benchmarks import field_similarity
    from recsys.features.table import FeatureTableError

    data, table = ml100k_with_field_table
    monkeypatch.setattr(field_similarity, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["field_similarity", "--dataset", str(data), "--table", f"synthetic={table}"])
    assert field_similarity.main() == 0
    record = json.loads((tmp_path / "field_similarity_ml-100k.json").read_text())
    m = np.array(record["tables"]["synthetic"]["matrix"])
    vectors = np.random.default_rng(0).standard_normal((len(record["fields"]), 8))  # as the fixture wrote them
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    assert np.allclose(m, unit @ unit.T, atol=1e-3) and np.allclose(np.diag(m), 1, atol=1e-3)
    assert (tmp_path / "field_similarity_ml-100k.png").stat().st_size > 0
    # one fine-tuning report per table, each under its table's name, in the record and its markdown
    reports = {}
    for name, after in (("a", 0.9), ("b", 0.4)):
        reports[name] = tmp_path / f"{name}.json"
        reports[name].write_text(json.dumps({"accuracy_before": 0.2, "accuracy_after": after, "chance": 0.1,
                                             "steps": 3, "model": f"model-{name}", "options": {"batch_size": "16"}}))
    monkeypatch.setattr(sys, "argv", ["field_similarity", "--dataset", str(data), "--table", f"a={table}",
                                      "--table", f"b={table}", "--report", f"a={reports['a']}",
                                      "--report", f"b={reports['b']}"])
    assert field_similarity.main() == 0
    record = json.loads((tmp_path / "field_similarity_ml-100k.json").read_text())
    assert {k: v["accuracy_after"] for k, v in record["fine_tuning"].items()} == {"a": 0.9, "b": 0.4}
    assert "| b | model-b |" in (tmp_path / "field_similarity_ml-100k.md").read_text()
    monkeypatch.setattr(sys, "argv", ["field_similarity", "--dataset", str(data), "--table", f"a={table}",
                                      "--report", f"c={reports['a']}"])
    with pytest.raises(SystemExit):
        field_similarity.main()
    schema = PreparedSchema.load(data)
    other = write_synthetic_table(tmp_path / "other.parquet", PreparedSchema(**{**schema.__dict__, "fingerprint": "x"}),
                                  FeatureEntity.FIELD, vectors, model_name="other")
    monkeypatch.setattr(sys, "argv", ["field_similarity", "--dataset", str(data), "--table", f"other={other}"])
    with pytest.raises(FeatureTableError, match="fingerprint"):
        field_similarity.main()
