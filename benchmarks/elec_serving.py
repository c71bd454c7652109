"""ELEC serving cost, side by side in one process: base, student, gain network, and the adapted language model.

    python -m benchmarks.elec_serving --dataset ml-1m --backbone deepfm --seed 1

Reads the runs of ``python -m benchmarks.elec`` (runs/bench/<tag>_<backbone>_{,elec_gain_,elec_student_both_}s<seed>).

- **base** and **student**: exported (``recsys.serve``) and loaded as served: unsharded backbone, eval mode.
- **gain**: the gain network with its language-model vectors in memory (two gathers and projections per row).
- **language model**: the adapted MiniLM scoring rows directly: user and item texts encoded, T, the
  prediction layer (texts are pre-built; only the model is timed, which favours it). At batch 4096 it is
  timed on ``--lm-rows`` rows and scaled per row (4096 rows of text take minutes on this CPU).

All models score the same test rows; the rounds interleave the models in a rotating order, so machine
noise and cache warmth hit all of them alike; each figure is the median over rounds. Results: benchmarks/results/elec_serving_<dataset>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import REPO, RESULTS, environment, environment_line, interleaved_medians, write_json


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-1m", choices=["ml-100k", "ml-1m"])
    p.add_argument("--backbone", default="deepfm")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--student", default="elec_student_both", help="the student variant's run name part")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--lm-rows", type=int, default=64, help="rows the language model scores for the large batch")
    p.add_argument("--keep-denormals", action="store_true",
                   help="do not flush denormal floats to zero (they slow CPU arithmetic by weight values alone)")
    args = p.parse_args()
    torch.set_flush_denormal(not args.keep_denormals)

    from embedding_jobs.ctr_adapt import entity_texts
    from embedding_jobs.elec_head import load_head, read_head_config
    from embedding_jobs.field_finetune import PooledEncoder
    from embedding_jobs.model_files import Pooling
    from embedding_jobs.prepared import PreparedData
    from embedding_jobs.templates import TemplateOptions
    from recsys.data.loader import ParquetBatches
    from recsys.data.schema import PreparedSchema
    from recsys.experiment import build_task, load_config
    from recsys.serve import export_run, load_exported
    from recsys.train.checkpoint import load_part

    tag = args.dataset.replace("-", "")
    bench = REPO / "runs" / "bench"
    data = REPO / "runs" / "data" / args.dataset
    run = {k: bench / f"{tag}_{args.backbone}_{v}s{args.seed}"
           for k, v in (("base", ""), ("gain", "elec_gain_"), ("student", f"{args.student}_"))}
    lm_folder = REPO / "runs" / "models" / f"{args.dataset}-elec"
    schema = PreparedSchema.load(data)
    tmp = Path(tempfile.mkdtemp(prefix="elec-serving-"))
    served = {k: load_exported(export_run(run[k], tmp / k)) for k in ("base", "student")}
    gain_cfg = load_config(run["gain"] / "config.yaml")
    gain = build_task(schema, gain_cfg, device=torch.device("cpu"))
    load_part(run["gain"] / "checkpoints" / "best", gain)
    gain.eval()

    head_cfg = read_head_config(lm_folder)
    encoder = PooledEncoder(lm_folder, head_cfg.max_length, None, pooling=Pooling.MEAN, normalize=False)
    encoder.model.eval()
    head = load_head(lm_folder, head_cfg)
    templates = TemplateOptions(**head_cfg.template_options)
    users, items = entity_texts(PreparedData.open(data), templates)

    @torch.no_grad()
    def gain_score(batch) -> torch.Tensor:
        return gain.score(batch)

    @torch.no_grad()
    def lm_score(rows: list[tuple[int, int]]) -> torch.Tensor:
        r_u = head.transform(encoder.encode([users.get(u, "") for u, _ in rows]))
        r_i = head.transform(encoder.encode([items.get(i, "") for _, i in rows]))
        return head(r_u, r_i)

    result: dict = {"command": "python -m benchmarks.elec_serving " + " ".join(sys.argv[1:]),
                    "dataset": args.dataset, "backbone": args.backbone, "seed": args.seed,
                    "runs": {k: str(v.relative_to(REPO)) for k, v in run.items()}, "latency_s": {}}
    for rows in (1, 4096):
        batch = next(iter(ParquetBatches(data, "test", schema, rows, extra_columns=gain.extra_columns)))
        ids = batch.sparse_features.to_dict()
        pairs = list(zip(ids[templates.user_key_field].values().tolist(),
                         ids[templates.item_key_field].values().tolist(), strict=True))
        lm_pairs = pairs if rows == 1 else pairs[: args.lm_rows]
        models: dict[str, Callable[[], object]] = {
            "base": lambda b=batch: served["base"].score(b),
            "student": lambda b=batch: served["student"].score(b),
            "gain": lambda b=batch: gain_score(b),
            "language model": lambda r=lm_pairs: lm_score(r),
        }
        lm_reps = max(3, args.rounds // 5) if rows > 1 else args.rounds
        medians = interleaved_medians(models, args.rounds, {"language model": lm_reps})
        scale = {"language model": rows / len(lm_pairs)}
        result["latency_s"][str(rows)] = {k: v * scale.get(k, 1.0) for k, v in medians.items()}
        result.setdefault("lm_rows_timed", {})[str(rows)] = len(lm_pairs)
    result["ratio_to_base"] = {b: {k: v / lat["base"] for k, v in lat.items()} for b, lat in result["latency_s"].items()}
    result["environment"] = environment()
    stem = RESULTS / f"elec_serving_{args.dataset}"
    write_json(stem.with_suffix(".json"), result)
    lines = [f"# ELEC serving cost on {args.dataset} ({args.backbone}, seed {args.seed})", "",
             f"Command: `{result['command']}`. Median of {args.rounds} interleaved rounds per model (the language "
             f"model: fewer rounds at batch 4096, timed on {result['lm_rows_timed']['4096']} rows and scaled to "
             "4096).", "",
             "| model | batch 1 latency | ratio to base | batch 4096 latency | ratio to base | rows/s at 4096 |",
             "|---|---|---|---|---|---|"]
    for k in ("base", "student", "gain", "language model"):
        one, big = result["latency_s"]["1"][k], result["latency_s"]["4096"][k]
        lines.append(f"| {k} | {one * 1e3:.3f} ms | {one / result['latency_s']['1']['base']:.3f} | "
                     f"{big * 1e3:.1f} ms | {big / result['latency_s']['4096']['base']:.3f} | {4096 / big:,.0f} |")
    env = result["environment"]
    lines += ["", "The student is the base architecture with other weights: its ratio measures noise, and the "
              "target is within 1.05. The gain network adds two vector gathers and projections and two more "
              "fields to the interaction. The language model encodes two texts per row.", "",
              environment_line(env, packages=False) + " Other processes may have shared the machine.", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
