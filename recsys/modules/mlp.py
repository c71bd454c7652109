"""The multi-layer perceptron that every deep backbone stacks on its interactions."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


class MLP(nn.Sequential):
    """Hidden layers only: ``Linear -> [BatchNorm] -> activation -> [Dropout]`` per size in ``hidden``.

    The output layer is left to the caller, so that the last hidden vector (a backbone's
    ``representation``) is a plain tensor between two modules. With ``hidden=()`` it is the identity.

    Example::

        mlp = MLP(64, hidden=(400, 400), dropout=0.1, device=torch.device("cpu"))
        h = mlp(torch.randn(8, 64))  # [8, mlp.output_dim] = [8, 400]
    """

    def __init__(
        self,
        input_dim: int,
        hidden: Sequence[int],
        activation: Callable[[], nn.Module] = nn.ReLU,
        batch_norm: bool = False,
        dropout: float = 0.0,
        device: torch.device | None = None,
    ) -> None:
        layers: list[nn.Module] = []
        dim = input_dim
        for size in hidden:
            layers.append(nn.Linear(dim, size, device=device))
            if batch_norm:
                layers.append(nn.BatchNorm1d(size, device=device))
            layers.append(activation())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            dim = size
        super().__init__(*layers)
        self._output_dim = dim

    @property
    def output_dim(self) -> int:
        return self._output_dim
