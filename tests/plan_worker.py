"""Worker of the plan-invariance test (run by torchrun): the same weights under every sharding plan.

    torchrun --nproc_per_node 2 tests/plan_worker.py SPEC.json OUT.json

``SPEC.json`` names the prepared dataset, the cases (an experiment's overrides and the checkpoint holding
its weights), the reference outputs computed without any sharding, and the plans to try. For every plan
and case this builds the task as the trainer does (meta device, fused optimizer, planner,
DistributedModelParallel), loads the weights through ``load_part`` (the path of teachers, warm starts and
exports; a student's teacher is loaded a second time through its warm start), runs the reference batches
on every rank and writes the largest differences from the reference logits and losses.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torchrec.modules.embedding_modules import EmbeddingCollection

from recsys.data.loader import ParquetBatches
from recsys.data.schema import PreparedSchema
from recsys.experiment import ExperimentConfig, build_task, load_config
from recsys.train.checkpoint import load_part
from recsys.train.config import ConfigError
from recsys.train.distributed import (
    CPU_SHARDING_TYPES,
    SEQUENCE_SHARDING_TYPES,
    describe_plan,
    embedding_tables,
    fuse_embedding_optimizer,
    init_distributed,
    plan_and_shard,
    table_configs,
)
from recsys.train.task import Task


def reference_batches(data: str, schema: PreparedSchema, batch_size: int, count: int) -> list:
    # ELEC's tasks read their vectors' keys from Batch.extras
    batches = ParquetBatches(data, "train", schema, batch_size, rank=0, world_size=1,
                             extra_columns=("user_id", "item_id"))
    return [b for _, b in zip(range(count), batches, strict=False)]


def build_case(schema: PreparedSchema, cfg: ExperimentConfig, sequences: list[str],
               device: torch.device | None = None) -> Task:
    """The experiment's task, or, with ``sequences``, the plain backbone reading those fields per position."""
    if sequences:
        return Task(cfg.model.build(schema, device, sequence_fields=tuple(sequences)))
    return build_task(schema, cfg, device)


def mixed_plan(task: torch.nn.Module) -> dict[str, str]:
    """Every sharding type at once: the tables, by name, take table-wise, column-wise, ... in turn (a
    per-position table among those its EmbeddingCollection can take)."""
    per_position = {c.name for m in embedding_tables(task) if isinstance(m, EmbeddingCollection)
                    for c in m.embedding_configs()}
    out = {}
    for i, name in enumerate(sorted({c.name for c in table_configs(task)})):
        types = [t for t in CPU_SHARDING_TYPES if t in SEQUENCE_SHARDING_TYPES] if name in per_position \
            else CPU_SHARDING_TYPES
        out[name] = types[i % len(types)]
    return out


def main(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    env = init_distributed()
    torch.set_num_threads(1)
    schema = PreparedSchema.load(spec["data"])
    batches = reference_batches(spec["data"], schema, spec["batch_size"], spec["num_batches"])
    reference = torch.load(spec["reference"], weights_only=True)
    results = []
    for plan in spec["plans"]:
        for case in spec["cases"]:
            cfg = load_config(None, case["overrides"])
            task = build_case(schema, cfg, case["sequences"])
            fuse_embedding_optimizer(task, cfg.optim)
            tables = mixed_plan(task) if plan["types"] == ["mixed"] else None
            try:
                dmp, sharding = plan_and_shard(task, env, spec["batch_size"], None if tables else plan["types"],
                                               tables)
            except ConfigError as e:  # a plan this model cannot take is refused before any collective
                results.append({"plan": plan["name"], "case": case["name"], "rank": env.rank, "refused": str(e)})
                continue
            load_part(case["checkpoint"], dmp)
            for prefix, (path, source) in task.warm_start().items():  # as the trainer warm-starts
                load_part(path, dmp, target_prefix=prefix, source_prefix=source)
            dmp.eval()
            ref = reference[case["name"]]
            d_logit = d_loss = 0.0
            with torch.no_grad():
                for i, batch in enumerate(batches):
                    loss, step = dmp(batch)
                    logits = step["logits"]
                    d_logit = max(d_logit, (logits - ref["logits"][i]).abs().max().item())
                    d_loss = max(d_loss, (loss - ref["loss"][i]).abs().item())
            results.append({"plan": plan["name"], "case": case["name"], "rank": env.rank,
                            "max_logit_diff": d_logit, "max_loss_diff": d_loss,
                            "sharding": describe_plan(sharding)})
    gathered = [None] * env.world_size
    torch.distributed.all_gather_object(gathered, results)
    if env.is_main:
        Path(out_path).write_text(json.dumps([r for rank in gathered for r in rank], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
