"""The training batch: what every model and the train pipeline consume."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

# Batch.extras key present when unlabeled rows join the training rows (``data.unlabeled_splits``): 1 for a
# row whose label counts, 0 for an unlabeled one (its label is 0 and no loss may read it)
LABELED = "labeled"


@dataclass
class Batch(Pipelineable):
    """TorchRec's ``Batch`` plus ``weights`` (1 for a real row, 0 for a padding row) and ``extras``.

    Every rank runs the same number of equally sized batches (sharded embeddings need all ranks in each
    step), so a rank's last batch is padded; padding rows carry weight 0 and count in no loss or metric.

    ``extras`` holds per-row dense tensors a method asks the loader for (``[B]`` or ``[B, L]``: token ids,
    attention masks, per-position side features), padded with zeros like everything else; moving, pinning
    and stream bookkeeping treat them like the other tensors, so ``TrainPipelineSparseDist`` carries them.
    """

    dense_features: torch.Tensor  # [B, num_dense] float32
    sparse_features: KeyedJaggedTensor  # one key per sparse field, in schema order
    labels: torch.Tensor  # [B] float32
    weights: torch.Tensor  # [B] float32
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return Batch(
            dense_features=self.dense_features.to(device=device, non_blocking=non_blocking),
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            weights=self.weights.to(device=device, non_blocking=non_blocking),
            extras={k: v.to(device=device, non_blocking=non_blocking) for k, v in self.extras.items()},
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.dense_features.record_stream(stream)
        self.sparse_features.record_stream(stream)
        self.labels.record_stream(stream)
        self.weights.record_stream(stream)
        for v in self.extras.values():
            v.record_stream(stream)

    def pin_memory(self) -> Batch:
        return Batch(
            dense_features=self.dense_features.pin_memory(),
            sparse_features=self.sparse_features.pin_memory(),
            labels=self.labels.pin_memory(),
            weights=self.weights.pin_memory(),
            extras={k: v.pin_memory() for k, v in self.extras.items()},
        )

    @property
    def batch_size(self) -> int:
        return self.labels.shape[0]
