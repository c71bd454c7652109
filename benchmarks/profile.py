"""Where a training step's time goes: torch.profiler on the real trainer (the TorchRec pipeline, DMP, the
fused embedding optimizer), one rank and two.

    python -m benchmarks.profile                                  # ML-1M, DeepFM and DCNv2, 1 and 2 ranks
    python -m benchmarks.profile --backbones deepfm --ranks 1 --steps 20 --trace runs/profile

Each case is its own process (``torch.distributed.run`` with 1 or 2 gloo ranks): an epoch of ``--steps``
steps to warm up, one under the profiler, then one without it (the wall time the
shares are scaled to, because the profiler adds its own cost). Rank 0's CPU time is split by the pipeline's
own phases (TrainPipelineSparseDist labels each: next batch, input distribution, forward, backward,
optimizer) and, inside forward and backward, by operator: FBGEMM's embedding kernels (in backward they
include the fused optimizer's update), linear layers (the MLP, DCNv2's cross layers), collectives, and the
rest of the dense arch (interaction, loss). What no labelled phase covers is the trainer's own loop
(loss readout, progress bar) and Python between phases. Then one evaluation pass over the validation split
(rows/s), the other half of a user's wait in training. ``--trace DIR`` also writes a Chrome trace per case.
Results: benchmarks/results/profile.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.common import REPO, RESULTS, environment, environment_line, python, write_json

CATEGORIES = [
    ("data", "data loading and KJT construction (next batch)"),
    ("input_dist", "input distribution (sparse features to their shards)"),
    ("emb_fwd", "embedding lookup, forward (FBGEMM)"),
    ("comm_fwd", "collectives in forward (output distribution)"),
    ("linear_fwd", "linear layers, forward"),
    ("dense_fwd", "interaction, loss and other dense ops, forward"),
    ("emb_bwd", "embedding backward with the fused optimizer update (FBGEMM)"),
    ("comm_bwd", "collectives in backward (gradient all-reduce, all-to-all)"),
    ("linear_bwd", "linear layers, backward"),
    ("dense_bwd", "interaction, loss and other dense ops, backward"),
    ("optimizer", "dense optimizer step and zero_grad"),
    ("other", "trainer loop, metrics and Python between phases"),
]
PHASE = re.compile(r"## (\w+?)(?: \d+)? ##")
PHASES = {"next_batch": "data", "copy_batch_to_gpu": "data", "start_sparse_data_dist": "input_dist",
          "wait_sparse_data_dist": "input_dist", "wait_for_batch": "input_dist", "forward": "forward",
          "backward": "backward", "optimizer": "optimizer", "zero_grad": "optimizer"}
COLLECTIVE = re.compile(r"c10d|gloo|all_to_all|alltoall|all_reduce|allreduce|record_param_comms|_Work", re.I)
EMBEDDING = re.compile(r"fbgemm|embedding|Lookup", re.I)
LINEAR = re.compile(r"aten::(addmm|mm|linear|matmul|bmm)\b|(Addmm|Mm|Bmm|T)Backward")


def category(phase: str | None, names: list[str]) -> str:
    """The category of an event whose enclosing phase label is ``phase`` and whose own and enclosing op names,
    innermost first, are ``names``."""
    if phase in (None, "data", "input_dist", "optimizer"):
        return phase or "other"
    side = "fwd" if phase == "forward" else "bwd"
    for name in names:  # the innermost op that says what it is decides
        if COLLECTIVE.search(name):
            return f"comm_{side}"
        if EMBEDDING.search(name):
            return f"emb_{side}"
        if LINEAR.search(name):
            return f"linear_{side}"
    return f"dense_{side}"


def split_events(events) -> dict[str, float]:
    """Self CPU time (microseconds) per category over the main thread's events."""
    main = max({e.thread for e in events}, key=lambda t: sum(e.self_cpu_time_total for e in events if e.thread == t))
    out: dict[str, float] = defaultdict(float)
    for e in events:
        if e.thread != main:
            continue
        chain, phase, p = [], None, e
        while p is not None:
            m = PHASE.fullmatch(p.name)
            if m and m.group(1) in PHASES:
                phase = PHASES[m.group(1)]
                break
            chain.append(p.name)
            p = p.cpu_parent
        out[category(phase, chain)] += e.self_cpu_time_total
    return dict(out)


def worker(args: argparse.Namespace) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from recsys.experiment import build_trainer, load_config
    from recsys.train.__main__ import quiet_third_party
    from recsys.train.trainer import RunState

    quiet_third_party()
    cfg = load_config(str(REPO / "benchmarks" / "configs" / "ml1m.yaml"),
                      [f"model.backbone={args.backbone}", "data.path=runs/data/ml-1m", f"train.out_dir={args.out_dir}",
                       f"name=profile_{args.backbone}_r{args.world}", "train.progress=false", "train.seed=1",
                       f"train.max_steps_per_epoch={args.steps}"])
    trainer = build_trainer(cfg)
    state = RunState()

    def epoch(e: int) -> float:
        start = time.perf_counter()
        trainer.train_epoch(e, state)
        return time.perf_counter() - start

    epoch(0)  # warm-up: the first steps allocate and fill the pipeline
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        profiled_s = epoch(1)
    wall_s = epoch(2)
    # evaluation is part of the user's wait too: one whole pass over the validation split, every rank's rows
    from recsys.data.loader import ParquetBatches

    valid_rows = ParquetBatches(cfg.data.path, "valid", trainer.schema, cfg.data.eval_batch_size).num_rows
    start = time.perf_counter()
    trainer.evaluate("valid")
    eval_s = time.perf_counter() - start
    if not trainer.env.is_main:
        return
    spent = split_events(prof.events())
    if args.trace:
        Path(args.trace).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(Path(args.trace) / f"{args.backbone}_r{args.world}.json"))
    known = sum(v for k, v in spent.items() if k != "other")
    result = {"backbone": args.backbone, "ranks": args.world, "steps": args.steps,
              "per_rank_batch": trainer.per_rank_batch, "threads": torch.get_num_threads(),
              "eval_rows_per_s": valid_rows / eval_s, "eval_rows": valid_rows,
              "profiled_ms_per_step": 1e3 * profiled_s / args.steps, "wall_ms_per_step": 1e3 * wall_s / args.steps,
              # the profiled epoch's wall time, less what the labelled phases account for, is the loop's own
              "us": {**spent, "other": max(0.0, profiled_s * 1e6 - known)}, "plan": trainer.plan_text}
    Path(args.json).write_text(json.dumps(result))


def run_case(backbone: str, ranks: int, steps: int, trace: str | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "profile.json"
        cmd = [python(), "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "-m", "benchmarks.profile", "--worker", "--backbone", backbone, "--world", str(ranks),
               "--steps", str(steps), "--json", str(out), "--out-dir", tmp]
        cmd += ["--trace", trace] if trace else []
        env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "LOGLEVEL": "WARNING"}
        subprocess.run(cmd, cwd=REPO, check=True, env=env)
        return json.loads(out.read_text())


def table(cases: list[dict]) -> list[str]:
    head = " | ".join(f"{c['backbone']}, {c['ranks']} rank{'s' * (c['ranks'] > 1)}" for c in cases)
    lines = [f"| where the time goes (ms per step, share) | {head} |", "|---|" + "---|" * len(cases)]
    for key, label in CATEGORIES:
        cells = []
        for c in cases:
            total = sum(c["us"].values())
            ms = c["us"].get(key, 0.0) / 1e3 / c["steps"] * c["wall_ms_per_step"] / c["profiled_ms_per_step"]
            cells.append(f"{ms:.1f} ({c['us'].get(key, 0.0) / total:.0%})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| **step, without the profiler** | " + " | ".join(
        f"**{c['wall_ms_per_step']:.1f}** ({c['per_rank_batch'] * c['ranks'] / c['wall_ms_per_step'] * 1e3:,.0f} "
        f"samples/s)" for c in cases) + " |")
    lines.append("| step, under the profiler | " + " | ".join(f"{c['profiled_ms_per_step']:.1f}" for c in cases) + " |")
    lines.append("| evaluation, validation split (rows/s) | " + " | ".join(
        f"{c['eval_rows_per_s']:,.0f}" for c in cases) + " |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["deepfm", "dcnv2"])
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    p.add_argument("--steps", type=int, default=30,
                   help="steps per epoch: one to warm up, one under the profiler, one timed without it")
    p.add_argument("--trace", default=None, help="also write a Chrome trace per case into this folder")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--backbone", "--json", "--out-dir"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    from benchmarks.quality import prepare_data

    prepare_data("ml-1m")
    cases = []
    for backbone in args.backbones:
        for ranks in args.ranks:
            print(f"profiling {backbone} with {ranks} rank(s): {args.steps} steps to warm up, {args.steps} "
                  f"profiled, {args.steps} timed", flush=True)
            cases.append(run_case(backbone, ranks, args.steps, args.trace))
    command = "python -m benchmarks.profile " + " ".join(sys.argv[1:])
    summary = {"command": command, "environment": environment(), "cases": cases}
    write_json(RESULTS / "profile.json", summary)
    lines = ["# Where a training step's time goes (ML-1M, batch 4096, the real trainer)", "",
             f"Command: `{command}`. Each column: {args.steps} warm-up steps, then {args.steps} steps under "
             "`torch.profiler` (CPU), then as many without it; rank 0's self CPU time by the pipeline's phase "
             "labels and, inside forward and backward, by operator, scaled to the step time without the profiler. "
             "With 2 ranks each rank takes half the global batch of 4096 and half the cores. Preparing ML-1M "
             "is timed in `prepare.md`.", ""]
    lines += table(cases)
    lines += ["", "Sharding plans (rank 0):", ""]
    for c in cases:
        lines += [f"- {c['backbone']}, {c['ranks']} rank(s), {c['threads']} intra-op thread(s): "
                  + "; ".join(c["plan"].splitlines()[:3])]
    lines += ["", environment_line(summary["environment"]), ""]
    (RESULTS / "profile.md").write_text("\n".join(lines))
    print("\n".join(table(cases)))
    print(f"wrote {RESULTS / 'profile.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
