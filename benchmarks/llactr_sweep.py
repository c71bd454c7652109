"""LLaCTR's loss weights tuned on validation AUC over the reference's grid, per backbone.

    python -m benchmarks.llactr_sweep --dataset ml-1m --split cold_item --backbones deepfm dcnv2 \
        --field-table runs/features/ml-1m_cold-item/field

Every (lambda_loss, lambda_llm) pair of the grid ({0.01, 0.05, 0.1, 0.3, 0.5, 0.7} for both, the reference's) is
one ``benchmarks.quality`` run on one seed, with the FRE loss summed over fields as the reference does
(``fre_reduction=sum``). ``--search coordinate`` visits 11 of the 36 cells instead: lambda_loss over the grid
at ``--start-llm``, then lambda_llm over the grid at the best lambda_loss (on the 6x6 record of ML-1M cold-item
it lands on DeepFM's best cell and 0.0008 valid AUC below DCNv2's, less than one seed's noise). The chosen
pair is the one with the best *validation* AUC; test AUC never enters the choice, and the record leaves it out so that nobody is tempted. Evaluate the chosen pair over 5 seeds with
``benchmarks.quality`` and ``benchmarks.compare`` (the record prints the commands).
Record: benchmarks/results/llactr_sweep_<data>.{md,json,png} (a validation-AUC heatmap per backbone). A rerun
with other backbones adds them to the record (same seed, table, reduction and adaptor, or it refuses). The
table is identified by a sha256 of its keys and vectors, not only its path: a table rebuilt under the same path
with other vectors (another fine-tuning) is refused too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import RESULTS, environment, environment_line, write_json
from benchmarks.quality import data_name, prepare_data, run_one

GRID = [0.01, 0.05, 0.1, 0.3, 0.5, 0.7]


def variant(lambda_loss: float, lambda_llm: float, reduction: str, adaptor: str) -> str:
    return f"llsweep_{reduction}_{adaptor}_loss{lambda_loss:g}_llm{lambda_llm:g}"


def overrides(field_table: str, lambda_loss: float, lambda_llm: float, reduction: str, adaptor: str) -> list[str]:
    return ["method.name=llactr", f"method.llactr.field_table={field_table}",
            f"method.llactr.lambda_loss={lambda_loss:g}", f"method.llactr.lambda_llm={lambda_llm:g}",
            f"method.llactr.fre_reduction={reduction}", f"method.llactr.adaptor={adaptor}"]


def best(grid: dict[str, float]) -> tuple[float, float, float]:
    """(lambda_loss, lambda_llm, valid AUC) of the best cell; ties go to the smaller weights (listed first)."""
    key = max(grid, key=lambda k: grid[k])
    loss, llm = (float(x) for x in key.split(","))
    return loss, llm, grid[key]


def search(evaluate: Callable[[float, float], float], losses: list[float], llms: list[float], how: str,
           start_llm: float) -> dict[str, float]:
    """Validation AUC per visited cell ``"loss,llm"``: every cell (``grid``), or lambda_loss over ``losses`` at
    ``start_llm`` and then lambda_llm over ``llms`` at the best of those (``coordinate``; no cell twice)."""
    cells: dict[str, float] = {}

    def visit(lo: float, ll: float) -> None:
        if f"{lo:g},{ll:g}" not in cells:
            cells[f"{lo:g},{ll:g}"] = evaluate(lo, ll)

    if how == "grid":
        for lo in losses:
            for ll in llms:
                visit(lo, ll)
        return cells
    for lo in losses:
        visit(lo, start_llm)
    lo = best(cells)[0]
    for ll in llms:
        visit(lo, ll)
    return cells


def table_sha256(folder: str | Path) -> str:
    """sha256 over a feature table's keys and vectors (key order), whatever its files' Parquet bytes."""
    from recsys.features.reader import read_file, table_files

    h = hashlib.sha256()
    for file in table_files(folder):
        _, keys, vectors = read_file(file)
        order = keys.argsort(kind="stable")
        h.update(keys[order].tobytes() + vectors[order].tobytes())
    return h.hexdigest()


def merge(old: dict, new: dict) -> dict:
    """``new`` with the backbones of an earlier record of the same sweep that it did not rerun. Backbones swept
    before the record held the table's sha256 are kept as they are (their table is not known to match)."""
    same = ("data", "seed", "field_table", "fre_reduction", "adaptor", "lambda_loss", "lambda_llm")
    differ = [k for k in same if old.get(k) != new[k]]
    if differ:
        raise SystemExit(f"the record of this dataset holds a sweep with other {', '.join(differ)} "
                         f"({', '.join(f'{k}={old.get(k)!r}' for k in differ)}); move it aside to start a new one")
    other = {b: r["field_table_sha256"] for b, r in old["backbones"].items()
             if r.get("field_table_sha256") not in (None, new["field_table_sha256"]) and b not in new["backbones"]}
    if other:
        raise SystemExit(f"{new['field_table']} holds other vectors than the table {', '.join(other)} were swept on "
                         f"(sha256 {next(iter(other.values()))[:12]}…, now {new['field_table_sha256'][:12]}…); "
                         "sweep them again on this table, or move the record aside")
    kept = {b: {"command": old["command"], **r} for b, r in old["backbones"].items()}  # each its own command
    return {**new, "backbones": {**kept, **new["backbones"]}}


def plot(summary: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    backbones = summary["backbones"]
    fig, axes = plt.subplots(1, len(backbones), figsize=(4.6 * len(backbones), 4.0), squeeze=False)
    losses, llms = summary["lambda_loss"], summary["lambda_llm"]
    for ax, (b, r) in zip(axes[0], backbones.items(), strict=True):
        # cells a coordinate search did not visit stay blank
        m = np.array([[r["valid_auc"].get(f"{lo:g},{ll:g}", np.nan) for ll in llms] for lo in losses])
        im = ax.imshow(np.ma.masked_invalid(m), cmap="viridis", origin="lower")
        for i, j in zip(*np.nonzero(~np.isnan(m)), strict=True):
            ax.text(j, i, f"{m[i, j]:.4f}", ha="center", va="center", fontsize=6.5,
                    color="white" if m[i, j] < np.nanmean(m) else "black")
        i, j = losses.index(r["chosen"]["lambda_loss"]), llms.index(r["chosen"]["lambda_llm"])
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
        ax.set_xticks(range(len(llms)), [f"{x:g}" for x in llms])
        ax.set_yticks(range(len(losses)), [f"{x:g}" for x in losses])
        ax.set(xlabel="lambda_llm (FIE)", ylabel="lambda_loss (FRE)", title=f"{b}: valid AUC (base {r['base_valid_auc']:.4f})")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"LLaCTR loss weights on {summary['data']}, seed {summary['seed']}, fre_reduction="
                 f"{summary['fre_reduction']}, adaptor={summary['adaptor']} (red: chosen)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["ml-100k", "ml-1m"], required=True)
    p.add_argument("--split", choices=["cold_item", "cold_user"], default=None)
    p.add_argument("--train-fraction", type=float, default=None)
    p.add_argument("--backbones", nargs="+", default=["deepfm", "dcnv2"])
    p.add_argument("--field-table", required=True, help="the LLM field table folder (embedding_jobs.run --entity field)")
    p.add_argument("--seed", type=int, default=1, help="the one seed the grid is searched on")
    p.add_argument("--lambda-loss", nargs="+", type=float, default=GRID)
    p.add_argument("--lambda-llm", nargs="+", type=float, default=GRID)
    p.add_argument("--fre-reduction", choices=["sum", "field_mean"], default="sum")
    p.add_argument("--adaptor", choices=["full", "scalar"], default="full")
    p.add_argument("--search", choices=["grid", "coordinate"], default="grid",
                   help="every cell, or lambda_loss at --start-llm then lambda_llm at the best (11 runs of 36)")
    p.add_argument("--start-llm", type=float, default=0.1, help="the lambda_llm of a coordinate search's first pass")
    args = p.parse_args()
    data = data_name(args.dataset, args.split, args.train_fraction)
    prepare_data(args.dataset, args.split, args.train_fraction)
    summary = {"dataset": args.dataset, "data": data, "seed": args.seed, "field_table": args.field_table,
               "field_table_sha256": table_sha256(args.field_table),
               "fre_reduction": args.fre_reduction, "adaptor": args.adaptor, "lambda_loss": args.lambda_loss,
               "lambda_llm": args.lambda_llm, "command": "python -m benchmarks.llactr_sweep " + " ".join(sys.argv[1:]),
               "environment": environment(), "backbones": {}}
    per_backbone = len(args.lambda_loss) * len(args.lambda_llm) if args.search == "grid" else (
        len(args.lambda_loss) + len(args.lambda_llm) - (args.start_llm in args.lambda_llm))
    total, done = len(args.backbones) * per_backbone, 0
    for b in args.backbones:
        base = run_one(args.dataset, data, b, args.seed, [])

        def evaluate(lo: float, ll: float, b: str = b) -> float:
            nonlocal done
            r = run_one(args.dataset, data, b, args.seed, overrides(args.field_table, lo, ll, args.fre_reduction,
                                                                    args.adaptor),
                        variant(lo, ll, args.fre_reduction, args.adaptor))
            done += 1
            print(f"[{done}/{total}] {b} lambda_loss={lo:g} lambda_llm={ll:g}: valid AUC {r['valid_auc']:.4f}",
                  flush=True)
            return r["valid_auc"]

        grid = search(evaluate, args.lambda_loss, args.lambda_llm, args.search, args.start_llm)
        loss, llm, auc = best(grid)
        summary["backbones"][b] = {"valid_auc": grid, "base_valid_auc": base["valid_auc"], "search": args.search,
                                   "command": summary["command"],
                                   "field_table_sha256": summary["field_table_sha256"],
                                   "chosen": {"lambda_loss": loss, "lambda_llm": llm, "valid_auc": auc}}
    name = f"llactr_sweep_{data}" + ("" if args.adaptor == "full" else f"_{args.adaptor}")
    md, js, png = (RESULTS / f"{name}.{ext}" for ext in ("md", "json", "png"))
    if js.is_file():  # an earlier sweep of other backbones on the same data: keep them
        summary = merge(json.loads(js.read_text()), summary)
    write_json(js, summary)
    flags = f"--dataset {args.dataset}" + (f" --split {args.split}" if args.split else "") + (
        f" --train-fraction {args.train_fraction}" if args.train_fraction is not None else "")
    lines = [f"# LLaCTR loss weights tuned on validation: {data}", "",
             "Commands: " + ", ".join(dict.fromkeys(f"`{r['command']}`" for r in summary["backbones"].values()))
             + f". One seed ({args.seed}); FRE reduction `{args.fre_reduction}`, adaptor "
             f"`{args.adaptor}`, field table `{args.field_table}`. The choice uses validation AUC only; test AUC is "
             "not shown here. One seed's validation AUC moves by about its seed-to-seed std (see the quality "
             "records), so neighbouring cells within that are a tie.", "",
             f"![heatmap]({png.name})", "",
             "| backbone | search (cells) | base valid AUC | chosen lambda_loss | chosen lambda_llm | its valid AUC | "
             "worst cell | table sha256 | 5-seed command |", "|---|---|---|---|---|---|---|---|---|"]
    for b, r in summary["backbones"].items():
        c = r["chosen"]
        cmd = (f"`python -m benchmarks.quality {flags} --backbones {b} --variant llactr_tuned "
               + " ".join(overrides(args.field_table, c["lambda_loss"], c["lambda_llm"], args.fre_reduction,
                                    args.adaptor)) + "`")
        lines.append(f"| {b} | {r.get('search', 'grid')} ({len(r['valid_auc'])}) | {r['base_valid_auc']:.4f} | "
                     f"{c['lambda_loss']:g} | {c['lambda_llm']:g} | "
                     f"{c['valid_auc']:.4f} | {min(r['valid_auc'].values()):.4f} | "
                     f"{r.get('field_table_sha256', 'not recorded')[:12]} | {cmd} |")
    lines += ["", environment_line(summary["environment"]), ""]
    md.write_text("\n".join(lines))
    plot(summary, png)
    print(f"wrote {md}, {js.name}, {png.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
