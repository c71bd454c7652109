"""Quality benchmark: test AUC and logloss of every backbone, overall and per regime, over 5 seeds.

    python -m benchmarks.quality --dataset ml-1m                          # prepares runs/data/ml-1m if needed
    python -m benchmarks.quality --dataset ml-1m --split cold_item        # 10% of the items held out
    python -m benchmarks.quality --dataset ml-1m --train-fraction 0.05    # 5% of the training rows
    python -m benchmarks.quality --dataset ml-100k --backbones deepfm dcnv2 --variant llactr method.name=llactr ...
    python -m benchmarks.quality --dataset ml-100k --backbones deepfm --variant 2ranks --ranks 2   # TorchX

Each run is ``python -m recsys.train --config benchmarks/configs/<dataset>.yaml`` with the backbone, seed and
prepared data overridden, in its own process; its run folder (config, metrics, curves, logs) stays under
runs/bench/. Every run reports its test split per regime (all, warm, cold user, cold item, long tail) and
GAUC, and the record keeps them per seed, so that ``benchmarks.compare`` can pair variants by seed.
The summary goes to benchmarks/results/quality_<data>[_<variant>].{json,md,png}, where <data> names the
dataset and its split (ml-1m, ml-1m_cold-item, ml-1m_sparse-5pct).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, RESULTS, environment, environment_line, fmt, mean_std, python, write_json

BACKBONES = ["fm", "deepfm", "dcnv2", "autoint", "finalmlp", "wukong"]
SEEDS = [1, 2, 3, 4, 5]
REGIMES = ["all", "warm", "cold_user", "cold_item", "long_tail"]


def data_name(dataset: str, split: str | None = None, train_fraction: float | None = None) -> str:
    """The prepared data's name: the dataset, then its split where it is not the dataset's own."""
    parts = [dataset]
    if split:
        parts.append(split.replace("_", "-"))
    if train_fraction is not None and train_fraction < 1:
        parts.append(f"sparse-{train_fraction * 100:g}pct")
    return "_".join(parts)


def prepare_data(dataset: str, split: str | None = None, train_fraction: float | None = None) -> Path:
    """The prepared data folder (runs/data/<data name>), made the first time it is asked for."""
    name = data_name(dataset, split, train_fraction)
    out = REPO / "runs" / "data" / name
    if not (out / "schema.json").is_file():
        cmd = [python(), "-m", "recsys.prepare", "--dataset", dataset, "--out", str(out), "--no-progress"]
        cmd += ["--split", split] if split else []
        cmd += ["--train-fraction", str(train_fraction)] if train_fraction is not None else []
        subprocess.run(cmd, cwd=REPO, check=True)
    return out


def run_name(data: str, backbone: str, seed: int, variant: str = "base") -> str:
    """The run folder's name under runs/bench/: <tag>_<backbone>[_<variant>]_s<seed>."""
    tag = data.replace("-", "")
    return f"{tag}_{backbone}_s{seed}" if variant == "base" else f"{tag}_{backbone}_{variant}_s{seed}"


def run_one(dataset: str, data: str, backbone: str, seed: int, extra: list[str], variant: str = "base",
            ranks: int = 1) -> dict:
    """One training run in its own process; with ``ranks`` > 1 through TorchX (``train_local -j 1xRANKS``)."""
    config = f"benchmarks/configs/{dataset.replace('-', '')}.yaml"
    tag = data.replace("-", "")
    name = run_name(data, backbone, seed, variant)
    out = REPO / "runs" / "bench" / name
    if (out / "test_metrics.json").is_file():
        return json.loads((out / "test_metrics.json").read_text())
    extra = [o.format(backbone=backbone, seed=seed, tag=tag) for o in extra]  # e.g. a teacher run per seed
    settings = [f"name={name}", f"data.path=runs/data/{data}", f"model.backbone={backbone}", f"train.seed={seed}",
                "train.progress=false", *extra]
    cmd = [python(), "-m", "recsys.train", "--config", config, *settings]
    bin_dir = str(Path(python()).parent)
    if ranks > 1:
        cmd = [f"{bin_dir}/torchx", "run", "-s", "local_cwd", "launch/components.py:train_local", "--config",
               config, "-j", f"1x{ranks}", *settings]
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


def per_seed(runs: list[dict]) -> dict:
    """What a record keeps of a backbone's runs: every figure as a list over seeds, regimes included."""
    keep = {k: [r[k] for r in runs] for k in ("test_auc", "test_logloss", "valid_auc", "best_epoch",
                                               "train_samples_per_s")}
    if all("test_regimes" in r for r in runs):
        keep["gauc"] = [r.get("test_gauc") for r in runs]
        keep["regimes"] = {name: {"auc": [r["test_regimes"][name]["auc"] for r in runs],
                                  "logloss": [r["test_regimes"][name]["logloss"] for r in runs],
                                  "rows": runs[0]["test_regimes"][name]["rows"]}
                           for name in REGIMES if name in runs[0]["test_regimes"]}
    return keep


def fmt_values(values: list[float | None]) -> str:
    """mean ± std, or '-' where a regime has no AUC (no rows, or one class)."""
    return "-" if not values or any(v is None for v in values) else fmt(values)


def regime_table(backbones: dict) -> list[str]:
    names = [n for n in REGIMES if any(n in b.get("regimes", {}) for b in backbones.values())]
    if not names:
        return []
    first = next(b for b in backbones.values() if "regimes" in b)
    head = " | ".join(f"{n.replace('_', ' ')} ({first['regimes'][n]['rows']:,} rows)" for n in names)
    lines = ["", "Test AUC per regime (warm: user and item have training rows; cold: no training row; long tail: "
             "the item has 1-5), and GAUC (per-user AUC weighted by rows, users with one class skipped):", "",
             f"| backbone | {head} | GAUC |", "|---|" + "---|" * (len(names) + 1)]
    for b, r in backbones.items():
        cells = [fmt_values(r["regimes"][n]["auc"]) if n in r.get("regimes", {}) else "-" for n in names]
        lines.append(f"| {b} | " + " | ".join(cells) + f" | {fmt_values(r.get('gauc', []))} |")
    return lines


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = summary["backbones"]
    names = [n for n in REGIMES if any(n in b.get("regimes", {}) for b in backbones.values())] or ["all"]
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(backbones)), 3.8))
    width = 0.8 / len(names)
    for j, regime in enumerate(names):
        xs, means, stds = [], [], []
        for i, b in enumerate(backbones.values()):
            values = b["regimes"][regime]["auc"] if "regimes" in b else b["test_auc"]
            if any(v is None for v in values):
                continue
            m, s = mean_std(values)
            xs.append(i + (j - (len(names) - 1) / 2) * width)
            means.append(m)
            stds.append(s)
        ax.bar(xs, means, width=width, yerr=stds, capsize=2, label=regime.replace("_", " "))
    ax.set_xticks(range(len(backbones)), list(backbones))
    low = min(min(b["regimes"][n]["auc"]) for b in backbones.values() if "regimes" in b for n in names
              if None not in b["regimes"][n]["auc"]) if any("regimes" in b for b in backbones.values()) else 0.5
    ax.set_ylim(max(0.4, low - 0.03), None)
    ax.set(title=f"test AUC per regime: {summary['data']}, {summary['variant']} ({len(summary['seeds'])} seeds, "
                 "mean ± std)", ylabel="AUC")
    ax.legend(fontsize=8, ncol=len(names))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _kept_backbones(js: Path, summary: dict, rerun: list[str]) -> dict:
    """The backbones of an earlier record of the same variant and seeds that this command does not rerun, with
    the command each came from: a variant tuned per backbone (its own overrides each) builds one record."""
    if not js.exists():
        return {}
    old = json.loads(js.read_text())
    if old.get("seeds") != summary["seeds"] or old.get("variant") != summary["variant"]:
        return {}
    commands = old.get("commands") or {b: old["command"] for b in old["backbones"]}
    return {b: (r, commands[b]) for b, r in old["backbones"].items() if b not in rerun}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["ml-100k", "ml-1m"], required=True)
    p.add_argument("--split", choices=["cold_item", "cold_user"], default=None,
                   help="prepare with this split instead of the dataset's own (time / random)")
    p.add_argument("--train-fraction", type=float, default=None, help="keep this fraction of the training rows")
    p.add_argument("--backbones", nargs="+", default=BACKBONES, choices=BACKBONES)
    p.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    p.add_argument("--ranks", type=int, default=1, help="gloo ranks per run; above 1 each run goes through TorchX")
    p.add_argument("--variant", default="base",
                   help="a name for what the overrides change (e.g. llactr); results go to quality_<data>_<variant>")
    p.add_argument("overrides", nargs="*",
                   help="extra section.key=value overrides for every run; {backbone}, {seed} and {tag} (the data's "
                        "name without dashes, e.g. ml100k, ml1m_colditem) are filled in, e.g. "
                        "method.elec.teacher_run=runs/bench/{tag}_{backbone}_elec_gain_s{seed}")
    args = p.parse_args()
    data = data_name(args.dataset, args.split, args.train_fraction)
    prepare_data(args.dataset, args.split, args.train_fraction)
    summary = {"dataset": args.dataset, "data": data, "variant": args.variant, "seeds": args.seeds,
               "config": f"benchmarks/configs/{args.dataset.replace('-', '')}.yaml", "overrides": args.overrides,
               "command": "python -m benchmarks.quality " + " ".join(sys.argv[1:]),
               "environment": environment(), "backbones": {}}
    name = f"quality_{data}" + ("" if args.variant == "base" else f"_{args.variant}")
    # not Path.with_suffix: a variant name may hold a dot (llactr_llm0.1)
    md, js, png = (RESULTS / f"{name}.{ext}" for ext in ("md", "json", "png"))
    summary["commands"] = {b: summary["command"] for b in args.backbones}
    kept = _kept_backbones(js, summary, args.backbones)
    for backbone in args.backbones:
        runs = [run_one(args.dataset, data, backbone, s, args.overrides, args.variant, args.ranks) for s in args.seeds]
        summary["backbones"][backbone] = per_seed(runs)
        print(f"{backbone:<9} test AUC {fmt([r['test_auc'] for r in runs])}  "
              f"logloss {fmt([r['test_logloss'] for r in runs])}", flush=True)
    for b, (record, command) in kept.items():
        summary["backbones"][b], summary["commands"][b] = record, command
    order = [b for b in BACKBONES if b in summary["backbones"]]  # one order, whichever ran first
    summary["backbones"] = {b: summary["backbones"][b] for b in order}
    summary["commands"] = {b: summary["commands"][b] for b in order}
    write_json(js, summary)
    commands = sorted(set(summary["commands"].values()))
    said = (f"Command: `{commands[0]}`" if len(commands) == 1 else "Commands (the backbones were tuned apart): "
            + "; ".join(f"{b}: `{c}`" for b, c in summary["commands"].items()))
    lines = [f"# Quality on {data}" + ("" if args.variant == "base" else f": {args.variant}"), "",
             f"{said} (config `{summary['config']}`), seeds {args.seeds}.", "",
             "| backbone | test AUC | test logloss | valid AUC | best epochs | train samples/s |",
             "|---|---|---|---|---|---|"]
    for b, r in summary["backbones"].items():
        lines.append(f"| {b} | {fmt(r['test_auc'])} | {fmt(r['test_logloss'])} | {fmt(r['valid_auc'])} | "
                     f"{r['best_epoch']} | {mean_std(r['train_samples_per_s'])[0]:,.0f} |")
    lines += regime_table(summary["backbones"])
    env = summary["environment"]
    lines += ["", "Train samples/s here are as measured while other jobs may have shared the machine: compare "
              "speed only in throughput.md, where both sides run in the same process. A best epoch equal to "
              "train.epochs means the model was still improving when training stopped. Compare variants with "
              "`python -m benchmarks.compare` (paired by seed)."]
    lines += ["", environment_line(env), ""]
    md.write_text("\n".join(lines))
    plot(summary, png)
    print(f"wrote {RESULTS / name}.md/.json/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
