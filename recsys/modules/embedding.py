"""Sparse arch: one TorchRec EmbeddingBagCollection for every model, and a per-position path for methods
that read sequences in order.

One table per vocabulary (a field that shares another field's vocabulary, such as a history of item ids,
shares its table too), mean pooling so single-valued, multi-valued and history fields all give one vector
per field. Built on the ``meta`` device by default: DistributedModelParallel materialises and shards it.

A method that needs a sequence position by position (SRP4CTR's encoder, for instance) builds the arch with
``sequence_fields``: the tables those fields use move into a TorchRec ``EmbeddingCollection`` (no pooling),
together with every field that shares them (``hist_item_id`` takes ``item_id`` along, so the target item
and the history read one table). Those fields' pooled vectors are then the mean of their positions, which
is what the bag would have computed; every other table stays in the EmbeddingBagCollection.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedTensor

from recsys.data.batch import Batch
from recsys.data.schema import FieldKind, PreparedField, PreparedSchema


def pooled_by_name(pooled: KeyedTensor, names: list[str]) -> torch.Tensor:
    """``[B, len(names) * D]``: the pooled embeddings of ``names``, in that order, read by feature name.

    Never rely on the order of a KeyedTensor's keys: a sharded EmbeddingBagCollection returns them grouped
    by shard, so the order follows the sharding plan (table-wise over 2 ranks, ``a..e`` come back as
    ``a, c, e, b, d``). ``regroup`` is TorchRec's own by-name permutation (one FBGEMM kernel), as in its DLRM.
    """
    return KeyedTensor.regroup([pooled], [names])[0]


def _tables(fields: tuple[PreparedField, ...] | list[PreparedField]) -> dict[str, list[str]]:
    tables: dict[str, list[str]] = {}
    for f in fields:
        tables.setdefault(f.table, []).append(f.name)
    return tables


def _bag_configs(schema: PreparedSchema, dim: int, prefix: str,
                 fields: list[PreparedField] | None = None) -> list[EmbeddingBagConfig]:
    sizes = {f.name: f.vocab_size for f in schema.sparse_fields}
    return [
        EmbeddingBagConfig(
            name=f"{prefix}{table}",
            embedding_dim=dim,
            num_embeddings=sizes[table],
            feature_names=names,
            pooling=PoolingType.MEAN,
        )
        for table, names in _tables(schema.sparse_fields if fields is None else fields).items()
    ]


@torch.fx.wrap  # a leaf of the train pipeline's fx trace: its shapes depend on the data
def masked_mean(jt: JaggedTensor, batch_size: int) -> torch.Tensor:
    """``[B, D]``: the mean of each row's positions (zeros for an empty row), as a MEAN bag pools."""
    values, lengths = jt.values(), jt.lengths()
    rows = torch.repeat_interleave(torch.arange(batch_size, device=lengths.device), lengths)
    total = values.new_zeros((batch_size, values.shape[1])).index_add(0, rows, values)
    return total / lengths.clamp(min=1).unsqueeze(1).to(total.dtype)


@torch.fx.wrap
def padded_positions(jt: JaggedTensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, length, D], mask [B, length])``: each row's positions in stored order, zero-padded."""
    padded = jt.to_padded_dense(desired_length=length)
    mask = torch.arange(length, device=padded.device).unsqueeze(0) < jt.lengths().unsqueeze(1)
    return padded, mask


class SparseArch(nn.Module):
    """Per-field embeddings ``[B, N, D]``: sparse fields in schema order, then dense fields.

    A dense field's embedding is its value times a learned vector (as in FuxiCTR), so every field is
    a D-vector and any backbone treats them alike. With ``sequence_fields``, :meth:`embed` also returns
    those fields position by position (see the module's docstring).

    Example::

        arch = SparseArch(schema, embedding_dim=16, device=torch.device("cpu"))
        emb = arch(batch)  # [batch_size, arch.num_fields, 16]
        arch = SparseArch(schema, 16, device=torch.device("cpu"), sequence_fields=("hist_item_id",))
        emb, seqs = arch.embed(batch)  # seqs["hist_item_id"]: ([B, max_length, 16], mask [B, max_length])
    """

    def __init__(self, schema: PreparedSchema, embedding_dim: int, device: torch.device | None = None,
                 sequence_fields: tuple[str, ...] = ()) -> None:
        super().__init__()
        if embedding_dim % 4:
            # FBGEMM's kernels need every table's dimension divisible by 4.
            raise ValueError(f"embedding_dim must be a multiple of 4 (FBGEMM), got {embedding_dim}")
        device = device or torch.device("meta")
        self.embedding_dim = embedding_dim
        self.sparse_names = [f.name for f in schema.sparse_fields]
        self.dense_names = [f.name for f in schema.dense_fields]
        for name in sequence_fields:
            f = schema.field(name)
            if f.kind is not FieldKind.SEQUENCE or not f.max_length:
                raise ValueError(f"sequence_fields: {name!r} is a {f.kind.value} field; only sequence fields (with "
                                 "a max_length) are read position by position")
        self.sequence_lengths = {name: schema.field(name).max_length for name in sequence_fields}
        per_position = {schema.field(n).table for n in sequence_fields}
        pooled = [f for f in schema.sparse_fields if f.table not in per_position]
        positional = [f for f in schema.sparse_fields if f.table in per_position]
        self.bag_names = [f.name for f in pooled]
        self.position_names = [f.name for f in positional]
        self.ebc = (EmbeddingBagCollection(_bag_configs(schema, embedding_dim, "t_", pooled), device=device)
                    if pooled else None)
        sizes = {f.name: f.vocab_size for f in schema.sparse_fields}
        self.ec = (EmbeddingCollection([EmbeddingConfig(name=f"t_{table}", embedding_dim=embedding_dim,
                                                        num_embeddings=sizes[table], feature_names=names)
                                        for table, names in _tables(positional).items()], device=device)
                   if positional else None)
        self.dense_weight = (nn.Parameter(torch.empty(len(self.dense_names), embedding_dim, device=device))
                             if self.dense_names else None)
        if device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.dense_weight is not None:
            nn.init.normal_(self.dense_weight, std=0.01)

    @property
    def field_names(self) -> list[str]:
        return self.sparse_names + self.dense_names

    @property
    def num_fields(self) -> int:
        return len(self.sparse_names) + len(self.dense_names)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.embed(batch)[0]

    def embed(self, batch: Batch) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """The ``[B, N, D]`` field embeddings, and each sequence field's ``([B, L, D], mask [B, L])``."""
        if self.ec is None:  # every table pooled: the bag's output read by name, schema order, any plan
            pooled = pooled_by_name(self.ebc(batch.sparse_features), self.sparse_names)
            emb = pooled.view(pooled.shape[0], -1, self.embedding_dim)
            sequences = {}
        else:
            b = batch.labels.shape[0]
            per_position = self.ec(batch.sparse_features)  # name -> JaggedTensor, read by name as well
            vectors = {name: masked_mean(per_position[name], b) for name in self.position_names}
            if self.bag_names:
                bags = pooled_by_name(self.ebc(batch.sparse_features), self.bag_names).view(b, -1, self.embedding_dim)
                vectors |= {name: bags[:, i] for i, name in enumerate(self.bag_names)}
            emb = torch.stack([vectors[name] for name in self.sparse_names], dim=1)
            sequences = {name: padded_positions(per_position[name], length)
                         for name, length in self.sequence_lengths.items()}
        if self.dense_names:
            dense = batch.dense_features.unsqueeze(-1) * self.dense_weight  # [B, n_dense, D]
            emb = torch.cat([emb, dense], dim=1)
        return emb, sequences


class FirstOrderArch(nn.Module):
    """The linear term ``sum_i w_i`` of FM-style models, as a TorchRec EBC.

    FBGEMM refuses dimension-1 tables, so each weight is a dimension-4 vector whose entries are summed:
    the same function class as a scalar weight.
    """

    DIM = 4

    def __init__(self, schema: PreparedSchema, device: torch.device | None = None) -> None:
        super().__init__()
        device = device or torch.device("meta")
        self.ebc = EmbeddingBagCollection(_bag_configs(schema, self.DIM, "lr_"), device=device)
        self.sparse_names = [f.name for f in schema.sparse_fields]
        self.dense = nn.Linear(len(schema.dense_fields), 1, device=device) if schema.dense_fields else None
        self.bias = nn.Parameter(torch.zeros(1, device=device))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.bias)

    def forward(self, batch: Batch) -> torch.Tensor:
        # a sum is order-free, but read by name anyway: no code depends on a sharded module's key order
        out = pooled_by_name(self.ebc(batch.sparse_features), self.sparse_names).sum(dim=1) + self.bias
        if self.dense is not None:
            out = out + self.dense(batch.dense_features).squeeze(-1)
        return out  # [B]


TABLE_PREFIXES = ("t_", "lr_")  # SparseArch's tables, FirstOrderArch's


@torch.no_grad()
def bake_lookup(model: nn.Module, lookup: dict[str, torch.Tensor | object]) -> int:
    """Copy into every row of an unsharded model's tables the row its id reads under ``lookup`` (per vocabulary,
    id -> row; ``recsys.data.loader.embedding_lookup``), so that the model scores stored ids as the trainer's
    loader fed them. Returns the number of tables changed."""
    changed = 0
    for m in model.modules():
        if isinstance(m, EmbeddingBagCollection):
            tables = m.embedding_bags
        elif isinstance(m, EmbeddingCollection):
            tables = m.embeddings
        else:
            continue
        for name, table in tables.items():
            vocab = next((name[len(p):] for p in TABLE_PREFIXES if name.startswith(p)), None)
            if vocab in lookup:
                rows = torch.as_tensor(lookup[vocab], dtype=torch.long, device=table.weight.device)
                table.weight.copy_(table.weight[rows])
                changed += 1
    return changed
