"""Every registered backbone on a tiny in-code schema and batch: shapes, gradients, the representation
contract, extra fields, meta-device construction, and the registry's errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.batch import Batch
from recsys.data.schema import Entity, FieldKind, PreparedField, PreparedSchema
from recsys.models import (
    BACKBONES,
    AutoIntConfig,
    Backbone,
    BackboneConfig,
    DCNv2Config,
    DeepFMConfig,
    FinalMLPConfig,
    WukongConfig,
    build_backbone,
)
from recsys.modules.interaction import InteractionAggregation

B, D = 4, 8
CPU = torch.device("cpu")


def _field(name: str, kind: FieldKind, vocab: int, table: str | None = None) -> PreparedField:
    return PreparedField(name=name, kind=kind, entity=Entity.USER, description=name, vocab_size=vocab,
                         vocab_file=None, table=table or name)


# The history field shares item_id's table, so the EBC's outputs are not in schema order.
SCHEMA = PreparedSchema(
    name="tiny", fingerprint="0", label="label", split_method="random", counts={}, stats={}, source={},
    fields=(
        _field("user_id", FieldKind.CATEGORICAL, 10),
        _field("item_id", FieldKind.CATEGORICAL, 12),
        _field("genres", FieldKind.MULTI_CATEGORICAL, 8),
        _field("history", FieldKind.SEQUENCE, 12, table="item_id"),
        _field("gender", FieldKind.CATEGORICAL, 4),
        _field("age", FieldKind.DENSE, 0),
    ),
)
NUM_FIELDS = len(SCHEMA.fields)


def make_batch(seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    keys, values, lengths = [], [], []
    for f in SCHEMA.sparse_fields:
        multi = f.kind is not FieldKind.CATEGORICAL
        lens = torch.randint(0 if multi else 1, 4 if multi else 2, (B,), generator=g)
        lens[0] = max(int(lens[0]), 1)  # every field has at least one value somewhere
        keys.append(f.name)
        lengths.append(lens)
        values.append(torch.randint(2, f.vocab_size, (int(lens.sum()),), generator=g))
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))
    return Batch(dense_features=torch.rand(B, len(SCHEMA.dense_fields), generator=g), sparse_features=kjt,
                 labels=torch.randint(0, 2, (B,), generator=g).float(), weights=torch.ones(B))


def build(name: str, config: BackboneConfig | None = None, num_extra_fields: int = 0,
          device: torch.device = CPU) -> Backbone:
    torch.manual_seed(0)
    return build_backbone(name, SCHEMA, embedding_dim=D, config=config, num_extra_fields=num_extra_fields,
                          device=device)


@pytest.fixture
def batch() -> Batch:
    return make_batch()


NAMES = sorted(BACKBONES)


def test_registry_names() -> None:
    assert set(BACKBONES) == {"fm", "deepfm", "dcnv2", "autoint", "finalmlp", "wukong"}


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_finite(name: str, batch: Batch) -> None:
    model = build(name)
    out = model(batch)
    assert out.logit.shape == (B,)
    assert out.representation.dim() == 2 and out.representation.shape == (B, model.representation_dim)
    assert out.field_embeddings.shape == (B, NUM_FIELDS, D)
    assert torch.isfinite(out.logit).all()
    assert out.logit.std() > 0  # rows are told apart


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_gradient(name: str, batch: Batch) -> None:
    model = build(name)
    out = model(batch)
    nn.functional.binary_cross_entropy_with_logits(out.logit, batch.labels, weight=batch.weights).backward()
    for table in ("t_user_id", "t_item_id", "t_genres", "t_gender"):
        grad = model.sparse_arch.ebc.embedding_bags[table].weight.grad
        assert grad is not None and grad.abs().sum() > 0, table
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"{name}: no gradient for {missing}"


@pytest.mark.parametrize("name", NAMES)
def test_representation_is_the_output_layers_input(name: str, batch: Batch) -> None:
    model = build(name)
    seen: list[torch.Tensor] = []
    layer = getattr(model, "output_layer", None)
    if layer is not None:
        layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    out = model(batch)
    (grad,) = torch.autograd.grad(out.logit.sum(), out.representation)
    assert grad.abs().sum(dim=1).min() > 0  # every row's logit depends on its representation
    if name == "fm":
        assert layer is None
        torch.testing.assert_close(out.logit, out.representation.sum(dim=-1))
        assert out.representation.shape == (B, 1 + D)
    else:
        assert len(seen) == 1 and seen[0] is out.representation


def test_fm_matches_pairwise_definition(batch: Batch) -> None:
    model = build("fm")
    out = model(batch)
    e = out.field_embeddings
    pairs = sum((e[:, i] * e[:, j]).sum(-1) for i, j in itertools.combinations(range(NUM_FIELDS), 2))
    torch.testing.assert_close(out.logit, model.first_order(batch) + pairs)


@pytest.mark.parametrize("name", NAMES)
def test_extra_fields(name: str, batch: Batch) -> None:
    model = build(name, num_extra_fields=2)
    extra = torch.randn(B, 2, D, requires_grad=True)
    out = model(batch, extra=extra)
    assert out.field_embeddings.shape == (B, NUM_FIELDS + 2, D)
    assert out.logit.shape == (B,) and torch.isfinite(out.logit).all()
    (grad,) = torch.autograd.grad(out.logit.sum(), extra)
    assert grad.abs().sum() > 0  # the extra fields reach the logit
    with pytest.raises(AssertionError, match="built for"):
        model(batch)


@pytest.mark.parametrize("name", NAMES)
def test_meta_build_then_materialise(name: str, batch: Batch) -> None:
    model = build(name, device=torch.device("meta"), num_extra_fields=1)
    assert all(p.is_meta for p in model.parameters())
    # What DistributedModelParallel does: every module that owns parameters is moved and re-initialised.
    model.to_empty(device=CPU)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            assert hasattr(module, "reset_parameters"), f"{type(module).__name__} cannot be materialised"
            module.reset_parameters()
    out = model(batch, extra=torch.randn(B, 1, D))
    assert torch.isfinite(out.logit).all() and torch.isfinite(out.representation).all()


@pytest.mark.parametrize(
    ("name", "config", "width"),
    [
        ("dcnv2", DCNv2Config(structure="stacked", hidden=(16,)), 16),
        ("dcnv2", DCNv2Config(hidden=(16,)), NUM_FIELDS * D + 16),
        ("autoint", AutoIntConfig(use_dnn=True, dnn_hidden=(16,)), NUM_FIELDS * 2 * 32 + 16),
        ("autoint", AutoIntConfig(num_layers=1, residual=False), NUM_FIELDS * 2 * 32),
        ("finalmlp", FinalMLPConfig(stream1_hidden=(8,), stream2_hidden=(12,), num_heads=4,
                                    fs1_context=("user_id",), fs2_context=("item_id", "age")), 20),
        ("finalmlp", FinalMLPConfig(use_feature_selection=False, stream1_hidden=(8,), stream2_hidden=(8,)), 16),
        ("wukong", WukongConfig(num_layers=2, num_fmb=3, num_lcb=3, rank=4, fmb_hidden=(16,), hidden=(8,)), 8),
        ("deepfm", DeepFMConfig(hidden=(16, 8), batch_norm=True, dropout=0.1), 8),
    ],
)
def test_variants(name: str, config: BackboneConfig, width: int, batch: Batch) -> None:
    model = build(name, config=config)
    out = model(batch)
    assert out.representation.shape == (B, width)
    out.logit.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"{name}: no gradient for {missing}"


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'dlrm'") as err:
        build_backbone("dlrm", SCHEMA, embedding_dim=D)
    assert all(n in str(err.value) for n in BACKBONES)


def test_wrong_config_type() -> None:
    with pytest.raises(TypeError, match="DCNv2Config"):
        build_backbone("dcnv2", SCHEMA, embedding_dim=D, config=DeepFMConfig())


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="structure"):
        DCNv2Config(structure="sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown field"):
        build("finalmlp", config=FinalMLPConfig(fs1_context=("nope",)))
    with pytest.raises(ValueError, match="num_heads"):
        InteractionAggregation(10, 12, num_heads=4)
