"""Quality benchmark: test AUC and logloss of every backbone, mean ± std over seeds.

    python -m benchmarks.quality --dataset ml-1m              # prepares into runs/data/ml-1m if needed
    python -m benchmarks.quality --dataset ml-100k --backbones deepfm dcnv2 --seeds 1 2 3
    python -m benchmarks.quality --dataset ml-100k --backbones deepfm dcnv2 --variant 2ranks --ranks 2  # TorchX

Each run is ``python -m recsys.train --config benchmarks/configs/<dataset>.yaml`` with the backbone and
seed overridden, in its own process; its run folder (config, metrics, curves, logs) stays under
runs/bench/. The summary goes to benchmarks/results/quality_<dataset>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, RESULTS, environment, fmt, mean_std, python, write_json

BACKBONES = ["fm", "deepfm", "dcnv2", "autoint", "finalmlp", "wukong"]


def run_name(dataset: str, backbone: str, seed: int, variant: str = "base") -> str:
    """The run folder's name under runs/bench/: <tag>_<backbone>[_<variant>]_s<seed>."""
    tag = dataset.replace("-", "")
    return f"{tag}_{backbone}_s{seed}" if variant == "base" else f"{tag}_{backbone}_{variant}_s{seed}"


def run_one(dataset: str, backbone: str, seed: int, extra: list[str], variant: str = "base", ranks: int = 1) -> dict:
    """One training run in its own process; with ``ranks`` > 1 through TorchX (``train_local -j 1xRANKS``)."""
    tag = dataset.replace("-", "")
    name = run_name(dataset, backbone, seed, variant)
    out = REPO / "runs" / "bench" / name
    if (out / "test_metrics.json").is_file():
        return json.loads((out / "test_metrics.json").read_text())
    extra = [o.format(backbone=backbone, seed=seed, tag=tag) for o in extra]  # e.g. a teacher run per seed
    settings = [f"name={name}", f"model.backbone={backbone}", f"train.seed={seed}", "train.progress=false", *extra]
    cmd = [python(), "-m", "recsys.train", "--config", f"benchmarks/configs/{tag}.yaml", *settings]
    bin_dir = str(Path(python()).parent)
    if ranks > 1:
        cmd = [f"{bin_dir}/torchx", "run", "-s", "local_cwd", "launch/components.py:train_local", "--config",
               f"benchmarks/configs/{tag}.yaml", "-j", f"1x{ranks}", *settings]
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}  # torchx's local_cwd runs `python` from PATH
    with open(out / "train.log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed; see {out / 'train.log'}")
    result = json.loads((out / "test_metrics.json").read_text())
    result["wall_s"] = time.perf_counter() - start
    (out / "test_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["backbones"])
    means = [mean_std(summary["backbones"][b]["test_auc"])[0] for b in names]
    stds = [mean_std(summary["backbones"][b]["test_auc"])[1] for b in names]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, means, yerr=stds, capsize=4, color="#4c72b0")
    lo = min(means) - 0.02
    ax.set_ylim(lo, max(means) + 0.01)
    for i, m in enumerate(means):
        ax.text(i, m + 0.001, f"{m:.4f}", ha="center", va="bottom", fontsize=8)
    ax.set(title=f"test AUC on {summary['dataset']}, {summary['variant']} ({len(summary['seeds'])} seeds, mean ± std)",
           ylabel="AUC")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["ml-100k", "ml-1m"], required=True)
    p.add_argument("--backbones", nargs="+", default=BACKBONES, choices=BACKBONES)
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--ranks", type=int, default=1, help="gloo ranks per run; above 1 each run goes through TorchX")
    p.add_argument("--variant", default="base",
                   help="a name for what the overrides change (e.g. llactr); results go to quality_<dataset>_<variant>")
    p.add_argument("overrides", nargs="*",
                   help="extra section.key=value overrides for every run; {backbone}, {seed} and {tag} (ml100k, "
                        "ml1m) are filled in, e.g. method.elec.teacher_run=runs/bench/{tag}_{backbone}_elec_gain_s{seed}")
    args = p.parse_args()
    data = REPO / "runs" / "data" / args.dataset
    if not (data / "schema.json").is_file():
        subprocess.run([python(), "-m", "recsys.prepare", "--dataset", args.dataset, "--out", str(data),
                        "--no-progress"], cwd=REPO, check=True)
    summary = {"dataset": args.dataset, "variant": args.variant, "seeds": args.seeds, "config": f"benchmarks/configs/"
               f"{args.dataset.replace('-', '')}.yaml", "overrides": args.overrides,
               "command": "python -m benchmarks.quality " + " ".join(sys.argv[1:]),
               "environment": environment(), "backbones": {}}
    for backbone in args.backbones:
        runs = [run_one(args.dataset, backbone, s, args.overrides, args.variant, args.ranks) for s in args.seeds]
        summary["backbones"][backbone] = {k: [r[k] for r in runs] for k in
                                          ("test_auc", "test_logloss", "valid_auc", "best_epoch",
                                           "train_samples_per_s")}
        print(f"{backbone:<9} test AUC {fmt([r['test_auc'] for r in runs])}  "
              f"logloss {fmt([r['test_logloss'] for r in runs])}", flush=True)
    name = f"quality_{args.dataset}" + ("" if args.variant == "base" else f"_{args.variant}")
    # not Path.with_suffix: a variant name may hold a dot (llactr_llm0.1)
    md, js, png = (RESULTS / f"{name}.{ext}" for ext in ("md", "json", "png"))
    write_json(js, summary)
    lines = [f"# Quality on {args.dataset}" + ("" if args.variant == "base" else f": {args.variant}"), "",
             f"Command: `{summary['command']}` (config `{summary['config']}`), seeds {args.seeds}.", "",
             "| backbone | test AUC | test logloss | valid AUC | best epochs | train samples/s |",
             "|---|---|---|---|---|---|"]
    for b, r in summary["backbones"].items():
        lines.append(f"| {b} | {fmt(r['test_auc'])} | {fmt(r['test_logloss'])} | {fmt(r['valid_auc'])} | "
                     f"{r['best_epoch']} | {mean_std(r['train_samples_per_s'])[0]:,.0f} |")
    env = summary["environment"]
    lines += ["", "Train samples/s here are as measured while other jobs may have shared the machine: compare "
              "speed only in throughput.md, where both sides run in the same process. A best epoch equal to "
              "train.epochs means the model was still improving when training stopped."]
    lines += ["", f"Environment: {env['cpu']}, {env['cores']} cores, Python {env['python']}, "
              + ", ".join(f"{k} {v}" for k, v in env["packages"].items()) + f"; commit {env['commit']}, "
              f"{env['date']}.", ""]
    md.write_text("\n".join(lines))
    plot(summary, png)
    print(f"wrote {RESULTS / name}.md/.json/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
