"""Training throughput: TorchRec DeepFM against a plain-PyTorch DeepFM, and 2 ranks against 1.

    python -m benchmarks.throughput                 # ML-1M, batch 4096, 3 alternating rounds
    python -m benchmarks.throughput --rounds 1 --steps 40

Both models see the same ``Batch`` stream (``recsys.data.loader``), so the comparison is the model and
optimizer step alone. The two are timed in alternating rounds in one process and compared as a ratio of
medians, because these machines are shared and noisy. The 2-rank figure runs the real trainer through
TorchX (``launch/components.py:train_local``, gloo) and is compared with a 1-rank TorchX run in the same
invocation. The roofline: the
MLP's matrix products alone, in a training step's shapes, timed in each round beside the two models; and
DeepFM's dense part alone (no lookups, no loading), eager and ``torch.compile``d, as the ceiling a trainer
could reach.
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


def time_dense(schema: PreparedSchema, batch: int, steps: int, compiled: bool) -> tuple[float, float]:
    """ms per training step of DeepFM's dense part alone (DNN, FM, BCE, Adam) on fixed field embeddings,
    eager or ``torch.compile``d, and the seconds the first compiled step took: the ceiling for any trainer
    of this model, since lookups and loading only add to it."""
    torch.manual_seed(0)
    model = PlainDeepFM(schema)
    dense = torch.compile(model.dense) if compiled else model.dense
    opt = torch.optim.Adam(model.dnn.parameters(), lr=1e-3)
    e = torch.randn(batch, len(model.keys), 16, requires_grad=True)
    y = torch.randint(0, 2, (batch,)).float()

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(dense(e), y).backward()
        opt.step()

    first = _ms_per_step(step, 1, warmup=0) / 1e3
    return _ms_per_step(step, steps), first


def mlp_matmul_ms(batch: int, num_fields: int, steps: int) -> float:
    """ms per training step of the MLP's matrix products alone, in the shapes the step computes them: per
    layer the forward product, the input gradient and the weight gradient. No trainer can take less."""
    sizes = mlp_sizes(num_fields)
    acts = [torch.randn(batch, n) for n in sizes]
    weights = [torch.randn(b, a) for a, b in zip(sizes, sizes[1:], strict=False)]

    def step() -> None:
        for x, w, y in zip(acts, weights, acts[1:], strict=False):
            x @ w.t()  # forward
            y @ w  # gradient of the input
            y.t() @ x  # gradient of the weight

    return _ms_per_step(step, steps)


def _ms_per_step(step, steps: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return 1e3 * (time.perf_counter() - start) / steps


def compile_verdict(eager_ms: float, compiled_ms: float, compile_s: float, batch: int) -> str:
    saved = eager_ms - compiled_ms
    first = f"the first compiled step took {compile_s:.0f} s (a cold compile cache)"
    if saved <= 0:
        return f"Compiling saves nothing here ({saved:+.1f} ms per step), and {first}."
    steps = compile_s * 1e3 / saved
    return (f"Compiling saves {saved:.1f} ms per step and {first}, so it pays after about {steps:,.0f} steps "
            f"({steps * batch / 1e6:.1f}M rows at this batch; ML-1M's training split is 0.59M rows an epoch).")


def mlp_sizes(num_fields: int, dim: int = 16, hidden: tuple[int, ...] = (400, 400)) -> list[int]:
    """The widths of DeepFM's MLP, input to logit (the default config's)."""
    return [num_fields * dim, *hidden, 1]


def deepfm_flops_per_sample(num_fields: int) -> float:
    """Dense fp32 FLOPs of one training sample (forward + backward = 3x forward) of the MLP."""
    sizes = mlp_sizes(num_fields)
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
    plain, torchrec, dense_eager, dense_compiled, matmul = [], [], [], [], []
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-inductor-")  # a cold first compile
    compile_s = time_dense(schema, args.batch_size, 1, compiled=True)[1]
    for r in range(args.rounds):
        batches = _batches(args.data, schema, args.batch_size, args.steps, r)
        warm = batches[: min(5, len(batches))]
        time_torchrec(trainer, warm)
        time_plain(schema, warm)
        torchrec.append(time_torchrec(trainer, batches))
        plain.append(time_plain(schema, batches))
        dense_eager.append(time_dense(schema, args.batch_size, args.steps // 2, compiled=False)[0])
        dense_compiled.append(time_dense(schema, args.batch_size, args.steps // 2, compiled=True)[0])
        matmul.append(mlp_matmul_ms(args.batch_size, len(schema.sparse_fields), args.steps // 2))
        print(f"round {r + 1}: torchrec {torchrec[-1]:,.0f} samples/s, plain {plain[-1]:,.0f} samples/s, dense part "
              f"alone {dense_eager[-1]:.1f} ms/step eager, {dense_compiled[-1]:.1f} compiled", flush=True)
    flops = deepfm_flops_per_sample(len(schema.sparse_fields))
    # the bound of each round from that round's matrix products, so that a slow spell of the shared machine
    # slows both sides of a fraction; fractions are medians of the rounds' fractions
    bound_ms = statistics.median(matmul)
    bound = 1e3 * args.batch_size / bound_ms
    gflops = flops * bound / 1e9
    tr, pl = statistics.median(torchrec), statistics.median(plain)
    de, dc = statistics.median(dense_eager), statistics.median(dense_compiled)

    def share(rates: list[float]) -> float:
        return statistics.median(m * r / (1e3 * args.batch_size) for m, r in zip(matmul, rates, strict=True))

    tr_share, pl_share = share(torchrec), share(plain)
    result = {
        "command": "python -m benchmarks.throughput " + " ".join(sys.argv[1:]),
        "dataset": schema.name, "batch_size": args.batch_size, "steps_per_round": args.steps,
        "torchrec_samples_per_s": torchrec, "plain_samples_per_s": plain,
        "ratio_torchrec_over_plain": tr / pl,
        "mlp_matmul_ms_per_step": matmul, "matmul_gflops_measured": gflops, "dense_flops_per_sample": flops, "dense_bound_samples_per_s": bound,
        "torchrec_fraction_of_bound": tr_share, "plain_fraction_of_bound": pl_share,
        "dense_alone_ms_eager": dense_eager, "dense_alone_ms_compiled": dense_compiled,
        "dense_alone_compile_s": compile_s, "peak_rss_mb_both_models": resource.getrusage(
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
             f"Roofline: the MLP costs {flops / 1e6:.2f} MFLOP per training sample. Its matrix products alone, in "
             f"the step's shapes (forward, input and weight gradients), took {bound_ms:.1f} ms per step here "
             f"(rounds: {', '.join(f'{x:.1f}' for x in matmul)}; {gflops:.0f} GFLOP/s), so the dense part alone "
             f"caps training near {bound:,.0f} samples/s. TorchRec reaches **{tr_share:.0%}** of that bound, plain "
             f"PyTorch {pl_share:.0%} (medians of each round's share, the bound measured in the same round).", "",
             # why a fixed multiple of plain PyTorch is not a free target: both pay for the same MLP
             f"So 1.5x plain ({1.5 * pl:,.0f} samples/s) would need {1.5 * pl_share:.0%} of the bound: the MLP's "
             f"products alone take {bound_ms:.1f} ms of such a {1e3 * args.batch_size / (1.5 * pl):.1f} ms step, "
             f"leaving {1e3 * args.batch_size / (1.5 * pl) - bound_ms:.1f} ms for the lookups, interaction, "
             "loss, optimizers and loading (`profile.md` gives their cost).", "",
             "| DeepFM's dense part alone (DNN, FM, BCE, Adam; fixed embeddings) | ms per step (median) | rounds | "
             "share of the bound |", "|---|---|---|---|",
             f"| eager | {de:.1f} | " + ", ".join(f"{x:.1f}" for x in dense_eager) + f" | {bound_ms / de:.0%} |",
             f"| `torch.compile` | {dc:.1f} | " + ", ".join(f"{x:.1f}" for x in dense_compiled)
             + f" | {bound_ms / dc:.0%} |", "",
             # what a compiled dense part could buy the trainer, and what it costs to get
             compile_verdict(de, dc, compile_s, args.batch_size),
             f"With no lookups or loading at all, the faster of the two would run at "
             f"{1e3 * args.batch_size / min(de, dc):,.0f} samples/s: {1e3 * args.batch_size / min(de, dc) / pl:.2f}x "
             "plain.", ""]
    if "ranks" in result:
        rk = result["ranks"]
        lines += ["| ranks (TorchX local_cwd, gloo, same global batch) | samples/s | peak RSS rank 0 (MB) |", "|---|---|---|",
                  f"| 1 | {rk['1_rank']['train_samples_per_s']:,.0f} | {rk['1_rank']['peak_rss_mb_rank0']:,.0f} |",
                  f"| 2 | {rk['2_rank']['train_samples_per_s']:,.0f} | {rk['2_rank']['peak_rss_mb_rank0']:,.0f} |",
                  "", f"2 ranks / 1 rank: **{rk['speedup_2_over_1']:.2f}x** on {os.cpu_count()} cores: two ranks "
                  "split the same cores, so each does half the work with half the threads, and adds the "
                  "all-to-all and gradient all-reduce through gloo; no speed-up is possible here beyond what "
                  "threading already gives one rank.", "",
                  # the first table times the models on batches already in memory; this is the user's wait
                  f"End to end, the 1-rank TorchX run (the trainer with its Parquet loading and KJT construction, "
                  f"epoch start included) reaches **{rk['1_rank']['train_samples_per_s'] / bound:.0%}** of the bound "
                  f"measured above ({1e3 * args.batch_size / rk['1_rank']['train_samples_per_s']:.1f} ms per step "
                  f"against {1e3 * args.batch_size / tr:.1f} ms on batches in memory).", ""]
    env = result["environment"]
    lines += [environment_line(env), ""]
    (RESULTS / "throughput.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
