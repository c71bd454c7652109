"""Training throughput: TorchRec DeepFM against a plain-PyTorch DeepFM, and 2 ranks against 1.

    python -m benchmarks.throughput                 # ML-1M, batch 4096, 3 alternating rounds
    python -m benchmarks.throughput --rounds 1 --steps 40

Both models see the same ``Batch`` stream (``recsys.data.loader``), so the comparison is the model and
optimizer step alone. The two are timed in alternating rounds in one process and compared as a ratio of
medians, because these machines are shared and noisy. The 2-rank figure runs the real trainer through
TorchX (``launch/components.py:train_local``, gloo) and is compared with a 1-rank TorchX run in the same
invocation. The roofline: the
dense part's fp32 FLOPs per sample against the matmul rate measured here, in the same run.
Results: benchmarks/results/throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import REPO, RESULTS, environment, environment_line, python, torchx_train, write_json
from benchmarks.plain_deepfm import PlainDeepFM
from recsys.data.loader import ParquetBatches
from recsys.data.schema import PreparedSchema


def _batches(data: Path, schema: PreparedSchema, batch: int, steps: int, epoch: int) -> list:
    loader = ParquetBatches(data, "train", schema, batch, shuffle=True, seed=1)
    loader.set_epoch(epoch)
    out = []
    for b in loader:
        out.append(b)
        if len(out) == steps:
            break
    return out


def time_plain(schema: PreparedSchema, batches: list) -> float:
    torch.manual_seed(0)
    model = PlainDeepFM(schema)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    for b in batches:
        opt.zero_grad()
        model.loss(b).backward()
        opt.step()
    return sum(b.batch_size for b in batches) / (time.perf_counter() - start)


def time_torchrec(trainer, batches: list) -> float:
    trainer.model.train()
    start = time.perf_counter()
    for _ in trainer._steps(iter(batches)):
        pass
    return sum(b.batch_size for b in batches) / (time.perf_counter() - start)


def matmul_gflops(batch: int, dim: int = 400, reps: int = 20) -> float:
    a, w = torch.randn(batch, dim), torch.randn(dim, dim)
    for _ in range(3):
        a @ w
    start = time.perf_counter()
    for _ in range(reps):
        a @ w
    return 2 * batch * dim * dim * reps / (time.perf_counter() - start) / 1e9


def deepfm_flops_per_sample(num_fields: int, dim: int = 16, hidden: tuple[int, ...] = (400, 400)) -> float:
    """Dense fp32 FLOPs of one training sample (forward + backward = 3x forward) of the MLP."""
    sizes = [num_fields * dim, *hidden, 1]
    fwd = sum(2 * a * b for a, b in zip(sizes, sizes[1:], strict=False))
    return 3.0 * fwd


def two_ranks(config: str, data: Path, steps: int) -> dict:
    """samples/s of the real trainer for 1 and 2 gloo ranks, launched through TorchX (local_cwd), over the
    same steps (the global batch is fixed, so each rank takes half of it)."""
    out = {}
    for ranks in (1, 2):
        run, wall = torchx_train(config, ranks, [f"data.path={data}", "train.epochs=1",
                                                 f"train.max_steps_per_epoch={steps}"])
        metrics = json.loads((run / "metrics.json").read_text())["history"][0]
        result = json.loads((run / "test_metrics.json").read_text())
        out[f"{ranks}_rank"] = {"train_samples_per_s": metrics["train_samples_per_s"],
                                "peak_rss_mb_rank0": result["peak_rss_mb_rank0"], "wall_s": wall}
    out["speedup_2_over_1"] = out["2_rank"]["train_samples_per_s"] / out["1_rank"]["train_samples_per_s"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO / "runs" / "data" / "ml-1m")
    p.add_argument("--config", default="benchmarks/configs/ml1m.yaml")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=100, help="training steps per timed round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-ranks", action="store_true", help="skip the 2-rank vs 1-rank measurement")
    args = p.parse_args()
    if not (args.data / "schema.json").is_file():
        subprocess.run([python(), "-m", "recsys.prepare", "--dataset", "ml-1m", "--out", str(args.data),
                        "--no-progress"], cwd=REPO, check=True)
    schema = PreparedSchema.load(args.data)
    from recsys.experiment import build_trainer, load_config

    tmp = tempfile.mkdtemp(prefix="bench-tp-")
    cfg = load_config(args.config, [f"data.path={args.data}", f"train.out_dir={tmp}", "name=tp",
                                    f"data.batch_size={args.batch_size}", "train.progress=false"])
    trainer = build_trainer(cfg)
    plain, torchrec = [], []
    for r in range(args.rounds):
        batches = _batches(args.data, schema, args.batch_size, args.steps, r)
        warm = batches[: min(5, len(batches))]
        time_torchrec(trainer, warm)
        time_plain(schema, warm)
        torchrec.append(time_torchrec(trainer, batches))
        plain.append(time_plain(schema, batches))
        print(f"round {r + 1}: torchrec {torchrec[-1]:,.0f} samples/s, plain {plain[-1]:,.0f} samples/s", flush=True)
    gflops = matmul_gflops(args.batch_size)
    flops = deepfm_flops_per_sample(len(schema.sparse_fields))
    bound = gflops * 1e9 / flops
    tr, pl = statistics.median(torchrec), statistics.median(plain)
    result = {
        "command": "python -m benchmarks.throughput " + " ".join(sys.argv[1:]),
        "dataset": schema.name, "batch_size": args.batch_size, "steps_per_round": args.steps,
        "torchrec_samples_per_s": torchrec, "plain_samples_per_s": plain,
        "ratio_torchrec_over_plain": tr / pl,
        "matmul_gflops_measured": gflops, "dense_flops_per_sample": flops, "dense_bound_samples_per_s": bound,
        "torchrec_fraction_of_bound": tr / bound, "plain_fraction_of_bound": pl / bound, "peak_rss_mb_both_models": resource.getrusage(
            resource.RUSAGE_SELF).ru_maxrss / 1024,
        "environment": environment(),
    }
    if not args.skip_ranks:
        result["ranks"] = two_ranks(args.config, args.data, args.steps)
    write_json(RESULTS / "throughput.json", result)
    lines = ["# Training throughput (DeepFM, ML-1M)", "", f"Command: `{result['command']}`", "",
             "| path | samples/s (median of rounds) | rounds |", "|---|---|---|",
             f"| TorchRec DeepFM (DMP, fused Adagrad, TrainPipelineSparseDist) | {tr:,.0f} | "
             + ", ".join(f"{x:,.0f}" for x in torchrec) + " |",
             f"| plain PyTorch DeepFM (nn.EmbeddingBag, Adam) | {pl:,.0f} | "
             + ", ".join(f"{x:,.0f}" for x in plain) + " |", "",
             f"Ratio TorchRec / plain: **{tr / pl:.2f}**.", "",
             f"Roofline: the MLP costs {flops / 1e6:.2f} MFLOP per training sample; fp32 matmul of the MLP's shape "
             f"ran at {gflops:.0f} GFLOP/s here, so the dense part alone caps training near {bound:,.0f} samples/s; "
             f"TorchRec reaches {tr / bound:.0%} of that bound.", "",
             # why a fixed multiple of plain PyTorch is not a free target: both pay for the same MLP
             f"Plain PyTorch reaches {pl / bound:.0%} of the same bound, so 1.5x plain ({1.5 * pl:,.0f} samples/s) "
             f"would need {1.5 * pl / bound:.0%} of it: the MLP's arithmetic alone takes "
             f"{1e3 * args.batch_size / bound:.1f} ms of such a {1e3 * args.batch_size / (1.5 * pl):.1f} ms step, "
             f"leaving {1e3 * args.batch_size * (1 / (1.5 * pl) - 1 / bound):.1f} ms for the lookups, interaction, "
             "loss, optimizers and loading (`profile.md` gives their cost).", ""]
    if "ranks" in result:
        rk = result["ranks"]
        lines += ["| ranks (TorchX local_cwd, gloo, same global batch) | samples/s | peak RSS rank 0 (MB) |", "|---|---|---|",
                  f"| 1 | {rk['1_rank']['train_samples_per_s']:,.0f} | {rk['1_rank']['peak_rss_mb_rank0']:,.0f} |",
                  f"| 2 | {rk['2_rank']['train_samples_per_s']:,.0f} | {rk['2_rank']['peak_rss_mb_rank0']:,.0f} |",
                  "", f"2 ranks / 1 rank: **{rk['speedup_2_over_1']:.2f}x** on {os.cpu_count()} cores: two ranks "
                  "split the same cores, so each does half the work with half the threads, and adds the "
                  "all-to-all and gradient all-reduce through gloo; no speed-up is possible here beyond what "
                  "threading already gives one rank.", ""]
    env = result["environment"]
    lines += [environment_line(env), ""]
    (RESULTS / "throughput.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
