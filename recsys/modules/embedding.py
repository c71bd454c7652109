"""Sparse arch: one TorchRec EmbeddingBagCollection for every model.

One table per vocabulary (a field that shares another field's vocabulary, such as a history of item ids,
shares its table too), mean pooling so single-valued, multi-valued and history fields all give one vector
per field. Built on the ``meta`` device by default: DistributedModelParallel materialises and shards it.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedTensor

from recsys.data.batch import Batch
from recsys.data.schema import PreparedSchema


def pooled_by_name(pooled: KeyedTensor, names: list[str]) -> torch.Tensor:
    """``[B, len(names) * D]``: the pooled embeddings of ``names``, in that order, read by feature name.

    Never rely on the order of a KeyedTensor's keys: a sharded EmbeddingBagCollection returns them grouped
    by shard, so the order follows the sharding plan (table-wise over 2 ranks, ``a..e`` come back as
    ``a, c, e, b, d``). ``regroup`` is TorchRec's own by-name permutation (one FBGEMM kernel), as in its DLRM.
    """
    return KeyedTensor.regroup([pooled], [names])[0]


def _bag_configs(schema: PreparedSchema, dim: int, prefix: str) -> list[EmbeddingBagConfig]:
    tables: dict[str, list[str]] = {}
    for f in schema.sparse_fields:
        tables.setdefault(f.table, []).append(f.name)
    sizes = {f.name: f.vocab_size for f in schema.sparse_fields}
    return [
        EmbeddingBagConfig(
            name=f"{prefix}{table}",
            embedding_dim=dim,
            num_embeddings=sizes[table],
            feature_names=names,
            pooling=PoolingType.MEAN,
        )
        for table, names in tables.items()
    ]


class SparseArch(nn.Module):
    """Per-field embeddings ``[B, N, D]``: sparse fields in schema order, then dense fields.

    A dense field's embedding is its value times a learned vector (as in FuxiCTR), so every field is
    a D-vector and any backbone treats them alike.

    Example::

        arch = SparseArch(schema, embedding_dim=16, device=torch.device("cpu"))
        emb = arch(batch)  # [batch_size, arch.num_fields, 16]
    """

    def __init__(self, schema: PreparedSchema, embedding_dim: int, device: torch.device | None = None) -> None:
        super().__init__()
        if embedding_dim % 4:
            # FBGEMM's kernels need every table's dimension divisible by 4.
            raise ValueError(f"embedding_dim must be a multiple of 4 (FBGEMM), got {embedding_dim}")
        device = device or torch.device("meta")
        self.embedding_dim = embedding_dim
        self.sparse_names = [f.name for f in schema.sparse_fields]
        self.dense_names = [f.name for f in schema.dense_fields]
        self.ebc = EmbeddingBagCollection(_bag_configs(schema, embedding_dim, "t_"), device=device)
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
        pooled = pooled_by_name(self.ebc(batch.sparse_features), self.sparse_names)  # schema order, any plan
        emb = pooled.view(pooled.shape[0], -1, self.embedding_dim)
        if self.dense_names:
            dense = batch.dense_features.unsqueeze(-1) * self.dense_weight  # [B, n_dense, D]
            emb = torch.cat([emb, dense], dim=1)
        return emb


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
