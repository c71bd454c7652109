"""FinalMLP (Mao et al., "FinalMLP: An Enhanced Two-Stream MLP Model for CTR Prediction", AAAI 2023)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from recsys.data.batch import Batch
from recsys.models.base import Backbone, CTROutput
from recsys.modules.embedding import SparseArch
from recsys.modules.interaction import FeatureSelection, InteractionAggregation
from recsys.modules.mlp import MLP


@dataclass(frozen=True)
class FinalMLPConfig:
    stream1_hidden: tuple[int, ...] = (400, 400)
    stream2_hidden: tuple[int, ...] = (400, 400)
    dropout: float = 0.0
    batch_norm: bool = False
    use_feature_selection: bool = True
    fs_hidden: tuple[int, ...] = (64,)  # the gates' hidden layers
    fs1_context: tuple[str, ...] = ()  # field names whose embeddings condition stream 1's gate
    fs2_context: tuple[str, ...] = ()  # (empty: a learned context vector)
    num_heads: int = 1  # bilinear aggregation heads; must divide both streams' last widths


class FinalMLP(Backbone):
    """Two MLP streams, each behind its own feature-selection gate, fused by multi-head bilinear aggregation.

    ``representation`` is ``[stream1 output, stream2 output]``, the input of ``output_layer``
    (the :class:`InteractionAggregation`, which is the model's output layer).

    Example::

        device = torch.device("cpu")
        config = FinalMLPConfig(fs1_context=("user_id",), fs2_context=("item_id",), num_heads=2)
        model = FinalMLP(SparseArch(schema, 16, device), config, device=device)
        out = model(batch)  # out.logit [B], out.representation [B, 800]
    """

    def __init__(
        self,
        sparse_arch: SparseArch,
        config: FinalMLPConfig,
        num_extra_fields: int = 0,
        device: torch.device | None = None,
    ) -> None:
        super().__init__(sparse_arch, num_extra_fields)
        device = device or torch.device("meta")
        self.config = config
        input_dim = self.num_fields * self.embedding_dim
        self.select1: nn.Module = nn.Flatten()
        self.select2: nn.Module = nn.Flatten()
        if config.use_feature_selection:
            self.select1 = FeatureSelection(input_dim, self._field_indices(config.fs1_context), self.embedding_dim,
                                            config.fs_hidden, device=device)
            self.select2 = FeatureSelection(input_dim, self._field_indices(config.fs2_context), self.embedding_dim,
                                            config.fs_hidden, device=device)
        self.stream1 = MLP(input_dim, config.stream1_hidden, batch_norm=config.batch_norm, dropout=config.dropout,
                           device=device)
        self.stream2 = MLP(input_dim, config.stream2_hidden, batch_norm=config.batch_norm, dropout=config.dropout,
                           device=device)
        self.output_layer = InteractionAggregation(self.stream1.output_dim, self.stream2.output_dim,
                                                   config.num_heads, device=device)

    def _field_indices(self, names: tuple[str, ...]) -> list[int]:
        known = self.sparse_arch.field_names
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"FinalMLP feature-selection context names unknown field(s) {unknown}; "
                             f"fields are {known}")
        return [known.index(n) for n in names]

    @property
    def representation_dim(self) -> int:
        return self.stream1.output_dim + self.stream2.output_dim

    def interact(self, emb: torch.Tensor, batch: Batch) -> CTROutput:
        hidden = torch.cat([self.stream1(self.select1(emb)), self.stream2(self.select2(emb))], dim=-1)
        return CTROutput(logit=self.output_layer(hidden), representation=hidden, field_embeddings=emb)
