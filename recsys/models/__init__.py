"""CTR backbones, one file each, and the registry that builds them by name.

Every backbone subclasses :class:`~recsys.models.base.Backbone` and is built the same way::

    Cls(sparse_arch: SparseArch, config: ClsConfig, num_extra_fields: int = 0,
        device: torch.device | None = None)

``device=None`` means ``meta``, like :class:`SparseArch`: DistributedModelParallel materialises the model.
The FM family (``fm``, ``deepfm``) also takes a keyword-only ``first_order: FirstOrderArch``, its linear
term; their :class:`BackboneSpec` says so (``first_order=True``) and :func:`build_backbone` builds it.

Every backbone but FM has ``output_layer``, the module whose input is ``CTROutput.representation``
(DeepFM adds its FM terms to that layer's output). FM's logit is the sum of its representation.

Example::

    model = build_backbone("dcnv2", schema, embedding_dim=16, config=DCNv2Config(structure="stacked"),
                           device=torch.device("cpu"))
    out = model(batch)  # CTROutput(logit [B], representation [B, H], field_embeddings [B, N, 16])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recsys.data.schema import PreparedSchema
from recsys.models.autoint import AutoInt, AutoIntConfig
from recsys.models.base import Backbone, CTROutput
from recsys.models.dcnv2 import DCNv2, DCNv2Config
from recsys.models.deepfm import DeepFM, DeepFMConfig
from recsys.models.finalmlp import FinalMLP, FinalMLPConfig
from recsys.models.fm import FM, FMConfig
from recsys.models.wukong import Wukong, WukongConfig
from recsys.modules.embedding import FirstOrderArch, SparseArch

BackboneConfig = FMConfig | DeepFMConfig | DCNv2Config | AutoIntConfig | FinalMLPConfig | WukongConfig


@dataclass(frozen=True)
class BackboneSpec:
    cls: type[Backbone]
    config: type[BackboneConfig]
    first_order: bool = False  # the constructor takes first_order=FirstOrderArch(schema, device)


BACKBONES: dict[str, BackboneSpec] = {
    "fm": BackboneSpec(FM, FMConfig, first_order=True),
    "deepfm": BackboneSpec(DeepFM, DeepFMConfig, first_order=True),
    "dcnv2": BackboneSpec(DCNv2, DCNv2Config),
    "autoint": BackboneSpec(AutoInt, AutoIntConfig),
    "finalmlp": BackboneSpec(FinalMLP, FinalMLPConfig),
    "wukong": BackboneSpec(Wukong, WukongConfig),
}


def build_backbone(
    name: str,
    schema: PreparedSchema,
    embedding_dim: int,
    config: BackboneConfig | None = None,
    num_extra_fields: int = 0,
    device: torch.device | None = None,
    sequence_fields: tuple[str, ...] = (),
) -> Backbone:
    """Build backbone ``name`` with its ``SparseArch`` (and ``FirstOrderArch``); ``config=None`` uses defaults.
    ``sequence_fields``: sequence fields a method reads position by position (``SparseArch.embed``)."""
    spec = BACKBONES.get(name)
    if spec is None:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(sorted(BACKBONES))}")
    if config is None:
        config = spec.config()
    elif not isinstance(config, spec.config):
        raise TypeError(f"backbone {name!r} takes a {spec.config.__name__}, got {type(config).__name__}")
    device = device or torch.device("meta")
    sparse_arch = SparseArch(schema, embedding_dim, device=device, sequence_fields=sequence_fields)
    if spec.first_order:
        return spec.cls(sparse_arch, config, num_extra_fields, device, first_order=FirstOrderArch(schema, device))
    return spec.cls(sparse_arch, config, num_extra_fields, device)


__all__ = [
    "BACKBONES", "BackboneSpec", "BackboneConfig", "build_backbone", "Backbone", "CTROutput",
    "FM", "FMConfig", "DeepFM", "DeepFMConfig", "DCNv2", "DCNv2Config", "AutoInt", "AutoIntConfig",
    "FinalMLP", "FinalMLPConfig", "Wukong", "WukongConfig",
]
