"""Compare variants against the base model, per backbone, from the quality benchmark's records.

    python -m benchmarks.compare --dataset ml-100k --variants llactr llactr_fre llactr_fie llactr_untuned

Reads benchmarks/results/quality_<dataset>.json (base) and quality_<dataset>_<variant>.json, writes
benchmarks/results/compare_<dataset>.md: mean ± std of test AUC and logloss, the difference to the base,
and whether it is within noise (smaller than twice its standard error over seeds).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from benchmarks.common import RESULTS, mean_std


def verdict(base: list[float], other: list[float]) -> tuple[float, str]:
    (mb, sb), (mo, so) = mean_std(base), mean_std(other)
    delta = mo - mb
    se = math.sqrt(sb**2 / len(base) + so**2 / len(other))
    if abs(delta) < 2 * se or se == 0 and delta == 0:
        return delta, "within noise"
    return delta, "better" if delta > 0 else "worse"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--variants", nargs="+", required=True)
    p.add_argument("--out", default=None, help="output name (default compare_<dataset>.md)")
    args = p.parse_args()
    base = json.loads((RESULTS / f"quality_{args.dataset}.json").read_text())
    lines = [f"# Variants against the base model on {args.dataset}", "",
             "Test AUC, mean ± std over seeds " + str(base["seeds"]) + "; Δ is the variant minus the base; "
             "'within noise' means |Δ| < 2 standard errors.", "",
             "| backbone | variant | test AUC | Δ AUC | verdict | test logloss | Δ logloss |", "|---|---|---|---|---|---|---|"]
    commands = {"base": base["command"]}
    for backbone, b in base["backbones"].items():
        m, s = mean_std(b["test_auc"])
        ml, sl = mean_std(b["test_logloss"])
        lines.append(f"| {backbone} | base | {m:.4f} ± {s:.4f} | | | {ml:.4f} ± {sl:.4f} | |")
        for variant in args.variants:
            path = RESULTS / f"quality_{args.dataset}_{variant}.json"
            if not path.is_file():
                continue
            record = json.loads(path.read_text())
            v = record["backbones"].get(backbone)
            if v is None:
                continue
            commands[variant] = record["command"]
            delta, word = verdict(b["test_auc"], v["test_auc"])
            dl, _ = verdict(b["test_logloss"], v["test_logloss"])
            m, s = mean_std(v["test_auc"])
            ml, sl = mean_std(v["test_logloss"])
            lines.append(f"| {backbone} | {variant} | {m:.4f} ± {s:.4f} | {delta:+.4f} | {word} | "
                         f"{ml:.4f} ± {sl:.4f} | {dl:+.4f} |")
    lines += ["", "Each variant's record (`quality_<dataset>_<variant>.md`) has its environment and per-seed values. "
              "The commands:", ""]
    lines += [f"- {k}: `{c}`" for k, c in commands.items()]
    out = RESULTS / (args.out or f"compare_{args.dataset}.md")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
