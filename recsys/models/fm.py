"""FM: the factorization machine (Rendle, "Factorization Machines", ICDM 2010)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recsys.data.batch import Batch
from recsys.models.base import Backbone, CTROutput
from recsys.modules.embedding import FirstOrderArch, SparseArch
from recsys.modules.interaction import FMInteraction


@dataclass(frozen=True)
class FMConfig:
    """FM has no hyper-parameters beyond the embedding dimension (given to the ``SparseArch``)."""


class FM(Backbone):
    """``logit = w_0 + sum_i w_i + sum_{i<j} <e_i, e_j>``.

    FM's logit is a sum, not a layer, so ``representation`` is the vector that is summed:
    ``[first-order term, 0.5 * ((sum_i e_i)^2 - sum_i e_i^2)]``, shape ``[B, 1 + D]`` (the second-order
    term per embedding dimension); ``logit == representation.sum(-1)``. The first-order term covers the
    schema's fields; extra fields enter the second-order term only.

    Example::

        device = torch.device("cpu")
        model = FM(SparseArch(schema, 16, device), FMConfig(), device=device,
                   first_order=FirstOrderArch(schema, device))
        out = model(batch)  # out.logit [B], out.representation [B, 17]
    """

    def __init__(
        self,
        sparse_arch: SparseArch,
        config: FMConfig,
        num_extra_fields: int = 0,
        device: torch.device | None = None,
        *,
        first_order: FirstOrderArch,
    ) -> None:
        super().__init__(sparse_arch, num_extra_fields)
        del device  # FM has no dense layers; the argument keeps the signature uniform
        self.config = config
        self.first_order = first_order
        self.second_order = FMInteraction(reduce=False)

    @property
    def representation_dim(self) -> int:
        return 1 + self.embedding_dim  # the first-order term, then the FM term per dimension

    def interact(self, emb: torch.Tensor, batch: Batch) -> CTROutput:
        terms = torch.cat([self.first_order(batch).unsqueeze(-1), self.second_order(emb)], dim=-1)
        return CTROutput(logit=terms.sum(dim=-1), representation=terms, field_embeddings=emb)
