"""ELEC's head on a language model, and its files next to the adapted model (see ``embedding_jobs.ctr_adapt``).

The head is the transformation MLP ``T`` (its output is the "high-level representation vector") and the
prediction layer on a (user, item) pair of them. Only ``T`` is needed to write feature tables; the
prediction layer is saved too, so the language model's own click scores can be reproduced.

Files, in the adapted model's folder:

- ``elec_head.json``: :class:`HeadConfig` (sizes, activation, pooling, max length and text templates of
  training, the stored-vector formula). Its presence is what makes the embedding job apply ``T``.
- ``elec_head/elec_head.safetensors``: the weights (``transform.*`` and ``predict.*``). In a sub-folder
  because vLLM loads every top-level ``*.safetensors`` of a model folder as the model's own weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from embedding_jobs.model_files import ModelError
from recsys.data.schema import SchemaError, resolve_inside

HEAD_CONFIG = "elec_head.json"
HEAD_WEIGHTS = "elec_head/elec_head.safetensors"
ELEC_TRANSFORM = "elec_transform"  # FeatureTableMetadata.head of a table that stores T(meanpool(...))
STORED_VECTOR = ("r = T(meanpool(H)) = W2 @ gelu(W1 @ meanpool(H) + b1) + b2, where H are the encoder's last "
                 "hidden states of the text and meanpool(H) = sum_t m_t H_t / sum_t m_t over the attention mask m "
                 "(no special-token exclusion, no L2 normalisation); gelu is the exact (erf) GELU; W1, b1, W2, b2 "
                 "are transform.0 and transform.2 in elec_head/elec_head.safetensors")
PREDICTION = "logit = predict([r_u, r_i, r_u * r_i]), p(click) = sigmoid(logit)"


@dataclass(frozen=True)
class HeadConfig:
    input_dim: int  # the encoder's hidden size
    hidden_dim: int
    rep_dim: int  # the size of the stored vector
    max_length: int  # tokens per text in training: the embedding job truncates at the same length
    template_options: dict[str, Any] = field(default_factory=dict)  # resolved TemplateOptions of training
    activation: str = "gelu"
    pooling: str = "mean"
    stored_vector: str = STORED_VECTOR
    prediction: str = PREDICTION
    weights: str = HEAD_WEIGHTS
    format_version: int = 1


class ElecHead(nn.Module):
    """``T``: Linear(h, hidden) -> GELU -> Linear(hidden, rep), shared by the user and the item tower; and the
    prediction layer Linear(3 rep, 1) on ``[r_u, r_i, r_u * r_i]``."""

    def __init__(self, input_dim: int, hidden_dim: int = 256, rep_dim: int = 64) -> None:
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, rep_dim))
        self.predict = nn.Linear(3 * rep_dim, 1)

    def forward(self, r_u: torch.Tensor, r_i: torch.Tensor) -> torch.Tensor:
        """Click logits ``[B]`` from representation vectors ``[B, rep]``."""
        return self.predict(torch.cat([r_u, r_i, r_u * r_i], dim=-1)).squeeze(-1)


def save_head(head: ElecHead, config: HeadConfig, folder: Path) -> None:
    from safetensors.torch import save_file

    (folder / config.weights).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(folder / config.weights))
    (folder / HEAD_CONFIG).write_text(json.dumps(asdict(config), indent=2) + "\n")


def read_head_config(folder: Path) -> HeadConfig | None:
    """The folder's head description, or None for a plain (not ELEC-adapted) model."""
    path = folder / HEAD_CONFIG
    if not path.is_file():
        return None
    try:
        config = HeadConfig(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"{path}: not a readable ELEC head description: {e}") from None
    if config.activation != "gelu" or config.pooling != "mean" or config.format_version != 1:
        raise ModelError(f"{path}: activation {config.activation!r}, pooling {config.pooling!r}, format "
                         f"{config.format_version}: only gelu, mean and format 1 are supported")
    try:
        resolve_inside(folder, config.weights, str(path))
    except SchemaError as e:
        raise ModelError(str(e)) from None
    if not (folder / config.weights).is_file():
        raise ModelError(f"{path} names the head weights {config.weights}, which are missing")
    return config


def load_head(folder: Path, config: HeadConfig | None = None) -> ElecHead:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = config or read_head_config(folder)
    if config is None:
        raise ModelError(f"{folder}: no {HEAD_CONFIG}: not an ELEC-adapted model")
    head = ElecHead(config.input_dim, config.hidden_dim, config.rep_dim)
    try:
        head.load_state_dict(load_file(str(folder / config.weights)))
    except (OSError, RuntimeError, SafetensorError) as e:
        raise ModelError(f"{folder / config.weights}: does not fit {HEAD_CONFIG}: {e}") from None
    return head.eval()
