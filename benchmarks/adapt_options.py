"""ELEC's language-model adaptation under stage B's options, side by side, and the gain network each gives.

    python -m benchmarks.adapt_options --dataset ml-1m --split cold_item             # both settings, DeepFM
    python -m benchmarks.adapt_options --dataset ml-100k --settings frozen_head --backbones deepfm dcnv2

Every setting adapts the packaged MiniLM with ``embedding_jobs.ctr_adapt`` on the same rows, seed and time
budget, into runs/models/<data>-elec-<setting>, then embeds every user and item with it
(runs/features/<data>-elec-<setting>) and trains the gain network (the ``elec_gain`` runs of
``benchmarks.elec``: the vectors as two extra fields) per backbone and seed through ``benchmarks.quality``
(variant ``elec_gain_<setting>``); ``benchmarks.compare`` then pairs them by seed with the base and with each
other. Each step is skipped when its output exists, so a rerun resumes.

The adaptation's validation AUC is measured on the same sampled validation rows that ``--eval-every`` selects
a step on, so for a setting that keeps its best step that figure is optimistic; the gain network's test AUC,
per regime and paired by seed, is the judge. Record: benchmarks/results/adapt_options_<data>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from benchmarks.common import REPO, RESULTS, environment, environment_line, python, write_json
from benchmarks.elec import gain_overrides, step
from benchmarks.quality import SEEDS, data_name, prepare_data

SETTINGS = {
    # every ELEC record so far: in stage B the head keeps stage A's rate, and the end state is kept
    "records": [],
    # the head frozen in stage B (stage A showed it overfits within a few passes), the best of every 20 steps kept;
    # the evaluations count against the same budget, so this setting trains fewer steps
    "frozen_head": ["--stage-b-head-lr", "0", "--eval-every", "20"],
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["ml-100k", "ml-1m"], required=True)
    p.add_argument("--split", choices=["cold_item", "cold_user"], default=None,
                   help="prepare with this split instead of the dataset's own")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--backbones", nargs="+", default=["deepfm"])
    p.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    p.add_argument("--budget-s", type=int, default=300, help="stage B's time budget (default %(default)s)")
    p.add_argument("--rows", type=int, default=20000, help="training rows the adaptation samples (default %(default)s)")
    p.add_argument("--engine", default="vllm", choices=["vllm", "transformers"])
    args = p.parse_args()
    ds = data_name(args.dataset, args.split)
    prepare_data(args.dataset, args.split)
    data, logs = REPO / "runs" / "data" / ds, REPO / "runs" / "bench" / "logs"
    split = ["--split", args.split] if args.split else []
    reports = {}
    for name in args.settings:
        model, tables = REPO / "runs" / "models" / f"{ds}-elec-{name}", REPO / "runs" / "features" / f"{ds}-elec-{name}"
        step([python(), "-m", "embedding_jobs.ctr_adapt", "--dataset", str(data), "--out", str(model),
              "--time-budget-s", str(args.budget_s), "--rows", str(args.rows), "--no-progress", *SETTINGS[name]],
             model / "report.json", logs / f"adapt_{ds}_{name}.log")
        reports[name] = json.loads((model / "report.json").read_text())
        step([python(), "-m", "embedding_jobs.run", "--entity", "user", "item", "--dataset", str(data), "--out",
              str(tables), "--model", str(model), "--engine", args.engine, "--no-progress"],
             tables / "item" / "table.parquet", logs / f"embed_{ds}_{name}.log")
        # tables relative to the repository, so the record's command runs in any checkout
        cmd = [python(), "-m", "benchmarks.quality", "--dataset", args.dataset, *split, "--backbones", *args.backbones,
               "--seeds", *map(str, args.seeds), "--variant", f"elec_gain_{name}",
               *gain_overrides(tables.relative_to(REPO))]
        print("run:", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)
    variants = [f"elec_gain_{n}" for n in args.settings]
    compares = [["--variants", *variants, "--out", f"compare_{ds}_adapt_options"]]
    if len(variants) > 1:
        compares.append(["--variants", *variants[1:], "--reference", variants[0],
                         "--out", f"compare_{ds}_adapt_options_vs_{args.settings[0]}"])
    for extra in compares:
        subprocess.run([python(), "-m", "benchmarks.compare", "--data", ds, "--backbones", *args.backbones, *extra],
                       cwd=REPO, check=True)
    report(args, ds, reports, [c[-1] for c in compares])
    return 0


KEYS = ("valid_auc_before", "valid_auc_head", "valid_auc_after", "kept", "steps", "rows_trained", "train_seconds",
        "seconds", "stage_b_head_lr", "stage_b_evaluations")


def report(args: argparse.Namespace, ds: str, reports: dict, compares: list[str]) -> None:
    summary = {"dataset": args.dataset, "data": ds, "command": "python -m benchmarks.adapt_options " + " ".join(sys.argv[1:]),
               "settings": {n: SETTINGS[n] for n in reports}, "environment": environment(),
               "adaptation": {n: {k: r.get(k) for k in KEYS} for n, r in reports.items()}, "compares": compares}
    write_json(RESULTS / f"adapt_options_{ds}.json", summary)
    lines = [f"# ELEC's adaptation options on {ds}", "", f"Command: `{summary['command']}`. The packaged MiniLM, "
             f"{args.rows} sampled training rows, stage B's budget {args.budget_s} s, seed 0 of the adaptation. "
             "Validation AUC of the language model alone (2,000 sampled validation rows; a setting that keeps its "
             "best step selects on these same rows, so its figure is optimistic).", "",
             "| setting | options | before | after stage A (head) | after stage B | kept | stage B steps | rows | "
             "stage B s | all s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n, a in summary["adaptation"].items():
        lines.append(f"| {n} | `{' '.join(SETTINGS[n]) or '(defaults)'}` | {a['valid_auc_before']:.4f} | "
                     f"{a['valid_auc_head']:.4f} | {a['valid_auc_after']:.4f} | {a['kept']} | {a['steps']} | "
                     f"{a['rows_trained']:,} | {a['train_seconds']:.0f} | {a['seconds']:.0f} |")
    for n, a in summary["adaptation"].items():
        if a["stage_b_evaluations"]:
            lines += ["", f"Stage B's validation AUC by step ({n}): " + ", ".join(
                f"{e['step']}: {e['valid_auc']:.4f}" for e in a["stage_b_evaluations"])]
    lines += ["", "The gain network on each setting's vectors (per regime, 5 seeds, paired by seed): "
              + ", ".join(f"`{c}.md`" for c in compares) + ".", "", environment_line(summary["environment"]), ""]
    (RESULTS / f"adapt_options_{ds}.md").write_text("\n".join(lines))
    print(f"wrote {RESULTS / f'adapt_options_{ds}'}.md/.json")


if __name__ == "__main__":
    raise SystemExit(main())
