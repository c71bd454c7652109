"""The exported model: a folder that loads and scores with ``recsys`` alone.

    model.pt      the backbone's state dict (plain tensors; loaded with ``weights_only=True``)
    schema.json   the prepared dataset's schema: fields, vocabulary sizes, fingerprint
    export.json   backbone name and configuration, embedding size, the run it came from and its test metrics

Methods whose spec says ``exports`` are exported as that bare backbone: their served logit is the backbone's
own (the plain backbone; ELEC's student, whose teacher, language model and feature tables stay behind). A
method whose served model is more than a backbone but needs no language model (SRP4CTR from its cached history
encodings) gives its spec an ``export_task`` and a ``load_task``: the export then holds the task's served
weights in ``model.pt``, the experiment's configuration in ``export.json``, and whatever files the method adds
(SRP4CTR: ``history/``, the cache); loading rebuilds the task from the registry.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from recsys.atomic import atomic_dir
from recsys.data.batch import Batch
from recsys.data.loader import embedding_lookup
from recsys.data.schema import PreparedSchema
from recsys.models import BACKBONES, build_backbone
from recsys.models.base import Backbone
from recsys.modules.embedding import bake_lookup
from recsys.train.checkpoint import UnsafeCheckpointError, load_part
from recsys.train.config import ConfigError, from_dict
from recsys.train.task import Task

FORMAT_VERSION = 1


@dataclass
class ExportedModel:
    """A loaded artifact: ``score(batch)`` returns logits, in eval mode, without autograd.

    ``model`` is the served backbone; ``task`` the whole served task where the method's export holds more
    than the backbone (then ``score`` is the task's)."""

    model: Backbone
    schema: PreparedSchema
    meta: dict[str, Any]
    task: Task | None = None

    @torch.no_grad()
    def score(self, batch: Batch) -> torch.Tensor:
        return self.task.score(batch) if self.task is not None else self.model(batch).logit


def export_run(run_dir: str | Path, out: str | Path, checkpoint: str = "best",
               inputs: dict[str, str] | None = None) -> Path:
    """Write the served model of a finished training run to ``out`` (replaced atomically). ``inputs``: what a
    method's ``export_task`` reads besides the run (SRP4CTR: ``history_cache``)."""
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and not (out / "export.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an exported model: refusing to replace it")
    from recsys.experiment import build_task, load_config
    from recsys.methods import METHODS
    from recsys.methods.registry import exportable, get_method

    cfg = load_config(run_dir / "config.yaml")
    spec = get_method(cfg.method.name)
    bare = exportable(cfg)
    if not bare and spec.export_task is None:
        names = sorted(n for n, s in METHODS.items() if s.exports or s.export_task)
        raise ConfigError(f"{run_dir} trained method {cfg.method.name!r}, whose served model needs more than "
                          f"recsys at serving time; {names} export, given options that keep their served model "
                          "free of language models and feature tables (a network that needs them is distilled into "
                          "a bare backbone first, e.g. elec_gain into elec_student)")
    schema = PreparedSchema.load(cfg.data.path)
    m = cfg.model
    ckpt = run_dir / "checkpoints" / checkpoint
    # the run looked rare and unseen ids up in <unk>'s row: the export's tables hold that row for them
    lookup = embedding_lookup(cfg.data.path, schema, cfg.data.min_count, cfg.data.unlabeled_splits)
    metrics_file = run_dir / "test_metrics.json"
    meta = {
        "format_version": FORMAT_VERSION, "backbone": m.backbone, "embedding_dim": m.embedding_dim,
        "backbone_config": dataclasses.asdict(m.backbone_config()), "method": cfg.method.name,
        "min_count": cfg.data.min_count,
        "dataset": schema.name, "fingerprint": schema.fingerprint, "source_run": str(run_dir),
        "checkpoint": checkpoint, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "test_metrics": json.loads(metrics_file.read_text()) if metrics_file.is_file() else None,
    }
    with atomic_dir(out) as tmp:
        if bare:
            backbone = m.build(schema, torch.device("cpu"))
            load_part(ckpt, backbone, source_prefix="model.")
            bake_lookup(backbone, lookup)
            state = backbone.state_dict()
        else:
            task = build_task(schema, cfg, torch.device("cpu"))
            task.set_stage(task.stages[-1])
            load_part(ckpt, task)
            bake_lookup(task, lookup)
            state, extra = spec.export_task(task.eval(), cfg, tmp, inputs or {})
            meta |= {"served": "task", "experiment": cfg.to_dict(), **extra}
        torch.save(state, tmp / "model.pt")
        (tmp / "schema.json").write_text(schema.to_json())
        (tmp / "export.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_exported(folder: str | Path) -> ExportedModel:
    folder = Path(folder)
    for name in ("model.pt", "schema.json", "export.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: is {folder} an exported model "
                                    "(python -m recsys.serve.export)?")
    meta = json.loads((folder / "export.json").read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder}: export format {meta.get('format_version')} is not {FORMAT_VERSION}")
    spec = BACKBONES.get(meta["backbone"])
    if spec is None:
        raise ValueError(f"{folder}: unknown backbone {meta['backbone']!r}")
    schema = PreparedSchema.load(folder)
    try:  # plain tensors only: weights_only refuses any other object, so loading runs no code
        state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"refusing {folder / 'model.pt'}: it holds more than tensors ({e})") from None
    if meta.get("served") == "task":
        return _load_task(folder, schema, meta, state)
    config = from_dict(spec.config, meta["backbone_config"], f"{folder / 'export.json'}:backbone_config")
    model = build_backbone(meta["backbone"], schema, meta["embedding_dim"], config, device=torch.device("cpu"))
    model.load_state_dict(state)
    return ExportedModel(model.eval(), schema, meta)


def _load_task(folder: Path, schema: PreparedSchema, meta: dict[str, Any], state: dict) -> ExportedModel:
    """A served task, rebuilt from the registry and the experiment recorded at export, with its method's files."""
    from recsys.experiment import ExperimentConfig, build_task
    from recsys.methods.registry import get_method

    cfg = from_dict(ExperimentConfig, meta["experiment"], f"{folder / 'export.json'}:experiment")
    method = get_method(cfg.method.name)
    if method.load_task is None:
        raise ValueError(f"{folder}: method {cfg.method.name!r} does not load as a served task")
    task = build_task(schema, cfg, torch.device("cpu"))
    task.set_stage(task.stages[-1])
    method.load_task(task, folder, state, meta)
    return ExportedModel(task.model.eval(), schema, meta, task.eval())
