"""Where computation runs: one choice for the trainer and the language-model jobs."""

from __future__ import annotations

import torch


def compute_device(local_rank: int = 0) -> torch.device:
    """The local rank's GPU where the machine has one, else the CPU."""
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
