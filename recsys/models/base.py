"""The CTR model contract (DESIGN.md contract 3) shared by every backbone and every method."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from recsys.data.batch import Batch
from recsys.modules.embedding import SparseArch


@dataclass
class CTROutput:
    logit: torch.Tensor  # [B] pre-sigmoid score
    representation: torch.Tensor  # [B, H] the input of the backbone's last (output) layer
    field_embeddings: torch.Tensor  # [B, N, D] per-field embeddings the interaction saw


class Backbone(nn.Module):
    """A CTR backbone: sparse arch -> interaction -> over arch.

    ``forward`` embeds the batch and hands the ``[B, N, D]`` field embeddings to ``interact``. Methods that
    add fields (for instance language-model representations projected to D) pass them as ``extra``: they
    are appended after the schema's fields, and the backbone was built with ``num_extra_fields`` for them.
    The loss is not here: see ``recsys.train.task``.
    """

    def __init__(self, sparse_arch: SparseArch, num_extra_fields: int = 0) -> None:
        super().__init__()
        self.sparse_arch = sparse_arch
        self.num_extra_fields = num_extra_fields

    @property
    def num_fields(self) -> int:
        return self.sparse_arch.num_fields + self.num_extra_fields

    @property
    def embedding_dim(self) -> int:
        return self.sparse_arch.embedding_dim

    @property
    def representation_dim(self) -> int:
        """H of ``CTROutput.representation``: the input size of ``output_layer`` (FM and FinalMLP override)."""
        return self.output_layer.in_features

    def forward(self, batch: Batch, extra: torch.Tensor | None = None) -> CTROutput:
        return self.from_embeddings(self.sparse_arch(batch), batch, extra)

    def from_embeddings(self, emb: torch.Tensor, batch: Batch, extra: torch.Tensor | None = None) -> CTROutput:
        """The rest of ``forward`` from field embeddings already looked up (a method that also reads
        ``sparse_arch.embed``'s sequences looks them up once)."""
        if extra is not None:
            emb = torch.cat([emb, extra], dim=1)
        # torch._assert, not `if`: the train pipeline traces forward with torch.fx
        torch._assert(emb.shape[1] == self.num_fields,
                      f"{type(self).__name__} was built for {self.num_fields} fields "
                      f"({self.num_extra_fields} of them extra)")
        return self.interact(emb, batch)

    def interact(self, emb: torch.Tensor, batch: Batch) -> CTROutput:
        raise NotImplementedError
