"""What a method costs over the base model: training step time and serving latency, in one run.

    python -m benchmarks.method_cost --dataset ml-1m --variant llactr method.name=llactr \
        method.llactr.field_table=runs/features/ml-1m/field

Training: the real trainer (sharded, fused optimizers, pipeline) for the base and the variant, timed in
alternating rounds of the same batches (the order swaps every round); serving: the unsharded model's scoring
path (``task.score``: the logit, no loss) in eval mode for batches of 1 and 4096 rows, one call of each per
round in alternating order, median over rounds. Ratios are variant / base (lower is cheaper).

``--field-model DIR`` (LLaCTR) adds the offline costs: the field fine-tuning time from the model's
report.json, and a timed run of the field-embedding job with that model (``--engine``).
Results: benchmarks/results/cost_<dataset>_<variant>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (
    REPO,
    RESULTS,
    environment,
    environment_line,
    interleaved_medians,
    python,
    write_json,
)
from recsys.data.loader import ParquetBatches
from recsys.data.schema import PreparedSchema


def _time_steps(trainer, batches: list) -> float:
    trainer.model.train()
    start = time.perf_counter()
    for _ in trainer._steps(iter(batches)):
        pass
    return time.perf_counter() - start


def _field_job_seconds(data, model: str, engine: str) -> float:
    """Wall time of the field-embedding job (a fresh process, model loading included) into a scratch folder."""
    out = tempfile.mkdtemp(prefix="bench-field-")
    cmd = [python(), "-m", "embedding_jobs.run", "--entity", "field", "--dataset", str(data), "--model", model,
           "--engine", engine, "--out", out, "--no-progress"]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-1m")
    p.add_argument("--variant", required=True)
    p.add_argument("--backbone", default="deepfm")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3, help="training rounds")
    p.add_argument("--latency-rounds", type=int, default=200, help="serving rounds (batch 4096: a tenth)")
    p.add_argument("--field-model", help="LLaCTR: the fine-tuned field model, for the offline costs")
    p.add_argument("--engine", default="vllm", choices=["vllm", "transformers"], help="engine of the field job")
    p.add_argument("overrides", nargs="+", help="section.key=value settings that make the variant")
    args = p.parse_args()
    from recsys.experiment import build_task, build_trainer, load_config

    tag = args.dataset.replace("-", "")
    data = REPO / "runs" / "data" / args.dataset
    schema = PreparedSchema.load(data)
    tmp = tempfile.mkdtemp(prefix="bench-cost-")
    common = [f"data.path={data}", f"train.out_dir={tmp}", "train.progress=false", f"model.backbone={args.backbone}"]
    config = f"benchmarks/configs/{tag}.yaml"
    cfgs = {"base": load_config(config, [*common, "name=base"]),
            "variant": load_config(config, [*common, "name=variant", *args.overrides])}
    trainers = {k: build_trainer(c) for k, c in cfgs.items()}
    per_rank = cfgs["base"].data.batch_size
    extras = tuple(dict.fromkeys(c for t in trainers.values() for c in t.task.extra_columns))
    loader = ParquetBatches(data, "train", schema, per_rank, shuffle=True, seed=1, extra_columns=extras,
                            lookup=trainers["base"].lookup)
    train_s = {"base": [], "variant": []}
    for r in range(args.rounds):
        loader.set_epoch(r)
        batches = [b for _, b in zip(range(args.steps), loader, strict=False)]
        for k in ("base", "variant") if r % 2 == 0 else ("variant", "base"):
            _time_steps(trainers[k], batches[:3])
            train_s[k].append(_time_steps(trainers[k], batches))
    latency = {}
    cpu = torch.device("cpu")
    tasks = {k: build_task(schema, c, device=cpu) for k, c in cfgs.items()}
    for task in tasks.values():
        task.eval()
    for rows in (1, 4096):
        one = next(iter(ParquetBatches(data, "test", schema, rows, extra_columns=extras,
                                       lookup=trainers["base"].lookup)))
        with torch.no_grad():
            latency[rows] = interleaved_medians({k: lambda t=t, b=one: t.score(b) for k, t in tasks.items()},
                                                args.latency_rounds if rows == 1 else args.latency_rounds // 10)
    offline = {}
    if args.field_model:
        report = json.loads((Path(args.field_model) / "report.json").read_text())
        offline = {"field fine-tuning (report.json)": report["train_seconds"],
                   f"field-embedding job ({args.engine}, process start to end)":
                       _field_job_seconds(data, args.field_model, args.engine)}
    ratio_train = statistics.median(train_s["variant"]) / statistics.median(train_s["base"])
    result = {"command": "python -m benchmarks.method_cost " + " ".join(sys.argv[1:]), "dataset": args.dataset,
              "backbone": args.backbone, "variant": args.variant, "overrides": args.overrides,
              "train_seconds_per_round": train_s, "steps_per_round": args.steps,
              "train_time_ratio": ratio_train, "latency_s": {str(k): v for k, v in latency.items()},
              "latency_ratio": {str(k): v["variant"] / v["base"] for k, v in latency.items()},
              "offline_seconds": offline,
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
    if offline:
        lines += ["", "Offline, once per dataset (no language model runs in training or serving):", "",
                  "| offline step | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in offline.items()]
    env = result["environment"]
    lines += ["", environment_line(env, packages=False) + " Both sides of each ratio ran interleaved in the same "
              "process, so noise from other processes hits both alike.", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
