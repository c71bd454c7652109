"""What a method costs over the base model: training step time and serving latency, in one run.

    python -m benchmarks.method_cost --dataset ml-1m --variant llactr method.name=llactr \
        method.llactr.field_table=runs/features/ml-1m/field

Training: the real trainer (sharded, fused optimizers, pipeline) for the base and the variant, timed in
alternating rounds of the same batches; serving: the unsharded model's scoring path (``task.score``: the
logit, no loss) in eval mode for batches of 1 and 4096 rows, median of many calls. Ratios are variant / base (lower is cheaper).
Results: benchmarks/results/cost_<dataset>_<variant>.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch

from benchmarks.common import REPO, RESULTS, environment, write_json
from recsys.data.loader import ParquetBatches
from recsys.data.schema import PreparedSchema


def _time_steps(trainer, batches: list) -> float:
    trainer.model.train()
    start = time.perf_counter()
    for _ in trainer._steps(iter(batches)):
        pass
    return time.perf_counter() - start


@torch.no_grad()
def _latency(task, batch, reps: int) -> float:
    task.eval()
    for _ in range(3):
        task.score(batch)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        task.score(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-1m")
    p.add_argument("--variant", required=True)
    p.add_argument("--backbone", default="deepfm")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("overrides", nargs="+", help="section.key=value settings that make the variant")
    args = p.parse_args()
    from recsys.methods.registry import build_task
    from recsys.train.config import load_config
    from recsys.train.trainer import Trainer

    tag = args.dataset.replace("-", "")
    data = REPO / "runs" / "data" / args.dataset
    schema = PreparedSchema.load(data)
    tmp = tempfile.mkdtemp(prefix="bench-cost-")
    common = [f"data.path={data}", f"train.out_dir={tmp}", "train.progress=false", f"model.backbone={args.backbone}"]
    config = f"benchmarks/configs/{tag}.yaml"
    cfgs = {"base": load_config(config, [*common, "name=base"]),
            "variant": load_config(config, [*common, "name=variant", *args.overrides])}
    trainers = {k: Trainer(c) for k, c in cfgs.items()}
    per_rank = cfgs["base"].data.batch_size
    loader = ParquetBatches(data, "train", schema, per_rank, shuffle=True, seed=1)
    train_s = {"base": [], "variant": []}
    for r in range(args.rounds):
        loader.set_epoch(r)
        batches = [b for _, b in zip(range(args.steps), loader, strict=False)]
        for k in ("base", "variant"):
            _time_steps(trainers[k], batches[:3])
            train_s[k].append(_time_steps(trainers[k], batches))
    latency = {}
    cpu = torch.device("cpu")
    tasks = {k: build_task(schema, c, device=cpu) for k, c in cfgs.items()}
    for rows in (1, 4096):
        one = next(iter(ParquetBatches(data, "test", schema, rows)))
        latency[rows] = {k: _latency(tasks[k], one, 200 if rows == 1 else 20) for k in ("base", "variant")}
    ratio_train = statistics.median(train_s["variant"]) / statistics.median(train_s["base"])
    result = {"command": "python -m benchmarks.method_cost " + " ".join(sys.argv[1:]), "dataset": args.dataset,
              "backbone": args.backbone, "variant": args.variant, "overrides": args.overrides,
              "train_seconds_per_round": train_s, "steps_per_round": args.steps,
              "train_time_ratio": ratio_train, "latency_s": {str(k): v for k, v in latency.items()},
              "latency_ratio": {str(k): v["variant"] / v["base"] for k, v in latency.items()},
              "environment": environment()}
    stem = RESULTS / f"cost_{args.dataset}_{args.variant}"
    write_json(stem.with_suffix(".json"), result)
    lines = [f"# Cost of {args.variant} over the base {args.backbone} on {args.dataset}", "",
             f"Command: `{result['command']}`", "",
             "| measure | base | variant | ratio variant/base |", "|---|---|---|---|",
             f"| training, {args.steps} steps (median of {args.rounds} alternating rounds) | "
             f"{statistics.median(train_s['base']):.2f} s | {statistics.median(train_s['variant']):.2f} s | "
             f"{ratio_train:.3f} |"]
    for rows, v in latency.items():
        lines.append(f"| serving latency, batch {rows} (median) | {v['base'] * 1e3:.3f} ms | "
                     f"{v['variant'] * 1e3:.3f} ms | {v['variant'] / v['base']:.3f} |")
    env = result["environment"]
    lines += ["", f"Environment: {env['cpu']}, {env['cores']} cores, Python {env['python']}; commit {env['commit']}, "
              f"{env['date']}. Other processes may have shared the machine; both sides of each ratio ran "
              "interleaved in the same process.", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
