"""Compare variants with a reference, paired by seed, per regime, from the benchmarks' records.

    python -m benchmarks.compare --data ml-100k --variants llactr llactr_random
    python -m benchmarks.compare --data ml-100k --variants llactr --reference llactr_random --out compare_x
    python -m benchmarks.compare --data ml-1m_cold-item --record elec_ml-1m_cold-item \\
        --variants elec_gain elec_student_score control_student_score

A variant's runs come from ``quality_<data>_<variant>.json`` or, with ``--record``, from that record (the ELEC
benchmark keeps all its variants in one). The reference is the base model (the record's own base runs where
it has them, trained beside its variants, else ``quality_<data>.json``) or another variant (``--reference``: a control such as a random-vector table, or a student distilled without a
language model). Runs are paired by seed (same seed, same data order, same initial weights for the parts
both share); each cell is the mean difference variant − reference over the seeds, its 95% interval, and the
verdict of a two-sided paired t-test at 5% (better / worse / within noise). Regimes: all, warm, cold user,
cold item, long tail, and GAUC. Writes benchmarks/results/<out>.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.common import RESULTS, environment, mean_std, write_json
from benchmarks.stats import Paired, paired

METRICS = ["all", "warm", "cold_user", "cold_item", "long_tail", "gauc"]


def load_runs(data: str, name: str, record: str | None) -> dict:
    """``{"seeds": [...], "backbones": {backbone: per-seed figures}}`` of the base or a variant. The base comes
    from the record where it holds base runs (trained beside its variants, so the pairs share one commit and
    data), else from ``quality_<data>.json``."""
    if record is None or (name == "base" and not _has_base(record)):
        path = RESULTS / (f"quality_{data}.json" if name == "base" else f"quality_{data}_{name}.json")
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `python -m benchmarks.quality` for it")
        r = json.loads(path.read_text())
        return {"seeds": r["seeds"], "backbones": r["backbones"], "command": _command(r)}
    r = json.loads((RESULTS / f"{record}.json").read_text())
    runs = {b: vs[name] for b, vs in r["runs"].items() if name in vs}
    if not runs:
        raise KeyError(f"{record}.json has no runs of {name!r}")
    return {"seeds": r["seeds"], "backbones": runs, "command": _command(r)}


def _has_base(record: str) -> bool:
    r = json.loads((RESULTS / f"{record}.json").read_text())
    return any("base" in vs for vs in r.get("runs", {}).values())


def _command(record: dict) -> str:
    """The record's command, or each backbone's where they were run apart (a variant tuned per backbone)."""
    commands = record.get("commands") or {}
    if len(set(commands.values())) > 1:
        return "; ".join(f"{b}: `{c}`" for b, c in commands.items())
    return f"`{record['command']}`"


def metric_values(figures: dict, metric: str) -> list[float | None]:
    """Per-seed values of one metric: a regime's test AUC, or GAUC (``all`` is the overall test AUC)."""
    if metric == "all":
        return figures["test_auc"]
    if metric == "gauc":
        return figures.get("gauc", [])
    return figures.get("regimes", {}).get(metric, {}).get("auc", [])


def compare(reference: dict, variant: dict, backbone: str, metric: str) -> Paired | None:
    seeds = [s for s in variant["seeds"] if s in reference["seeds"]]
    ref = metric_values(reference["backbones"][backbone], metric)
    var = metric_values(variant["backbones"][backbone], metric)
    if not ref or not var:
        return None
    a = [ref[reference["seeds"].index(s)] for s in seeds]
    b = [var[variant["seeds"].index(s)] for s in seeds]
    if any(v is None for v in a + b):
        return None  # a regime with no rows or one class has no AUC
    return paired(a, b)


def cell(r: Paired | None) -> str:
    if r is None:
        return "-"
    return f"{r.mean:+.4f} [{r.low:+.4f}, {r.high:+.4f}] {r.verdict}"


def plot(table: dict, path: Path, reference: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = list(table)
    fig, axes = plt.subplots(1, len(backbones), figsize=(6 * len(backbones), 3.8), squeeze=False)
    for ax, b in zip(axes[0], backbones, strict=True):
        variants = list(table[b])
        width = 0.8 / max(1, len(variants))
        for j, v in enumerate(variants):
            xs, ys, lo, hi = [], [], [], []
            for i, m in enumerate(METRICS):
                r = table[b][v].get(m)
                if r is None:
                    continue
                xs.append(i + (j - (len(variants) - 1) / 2) * width)
                ys.append(r["mean"])
                lo.append(r["mean"] - r["low"])
                hi.append(r["high"] - r["mean"])
            ax.bar(xs, ys, width=width, yerr=[lo, hi], capsize=2, label=v)
        ax.axhline(0, color="#555555", lw=0.8)
        ax.set_xticks(range(len(METRICS)), [m.replace("_", " ") for m in METRICS], fontsize=8)
        ax.set(title=f"{b}: AUC − {reference} (mean, 95% interval)", ylabel="Δ AUC")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the prepared data's name, e.g. ml-100k, ml-1m_cold-item")
    p.add_argument("--variants", nargs="+", required=True)
    p.add_argument("--reference", default="base", help="what the variants are compared with (default: base)")
    p.add_argument("--record", default=None, help="read variants (and a non-base reference) from this record")
    p.add_argument("--reference-record", default=None,
                   help="read a non-base reference from this record instead (default: --record). Pairing runs of two "
                        "records by seed is sound only if both trained the same base model: their base runs must "
                        "agree seed by seed, or the comparison is refused")
    p.add_argument("--backbones", nargs="*", default=None, help="default: every backbone both have")
    p.add_argument("--out", default=None, help="output name (default compare_<data>[_vs_<reference>])")
    args = p.parse_args(argv)
    reference = load_runs(args.data, args.reference, args.reference_record or args.record)
    variants = {v: load_runs(args.data, v, args.record) for v in args.variants}
    if args.reference_record and args.record and args.reference_record != args.record:
        same_base(args.data, args.record, args.reference_record)
    backbones = args.backbones or [b for b in reference["backbones"]
                                   if any(b in v["backbones"] for v in variants.values())]
    if missing := [b for b in backbones if b not in reference["backbones"]]:
        raise SystemExit(f"no {args.reference} runs of {', '.join(missing)} to compare with")
    table: dict[str, dict[str, dict]] = {}
    for b in backbones:
        table[b] = {}
        for name, v in variants.items():
            if b not in v["backbones"]:
                continue
            table[b][name] = {m: (r.__dict__ | {"verdict": r.verdict} if (r := compare(reference, v, b, m)) else None)
                              for m in METRICS}
    out = args.out or f"compare_{args.data}" + ("" if args.reference == "base" else f"_vs_{args.reference}")
    seeds = sorted(set(reference["seeds"]).intersection(*(v["seeds"] for v in variants.values())))
    write_json(RESULTS / f"{out}.json", {"data": args.data, "reference": args.reference, "seeds": seeds,
                                         "command": "python -m benchmarks.compare " + " ".join(sys.argv[1:]),
                                         "environment": environment(), "table": table})
    lines = [f"# Variants against {args.reference} on {args.data}, paired by seed", "",
             f"Seeds {seeds}. Each cell: mean test-AUC difference variant − {args.reference} over the seeds, its 95% "
             "interval, and the verdict of a two-sided paired t-test at 5%. Regimes as in the quality records "
             "(warm: user and item have training rows; cold: none; long tail: the item has 1-5); GAUC: per-user "
             "AUC weighted by rows. '-': the regime has no rows or one class.", ""]
    for b, vs in table.items():
        lines += [f"## {b}", "", f"{args.reference}: test AUC {fmt_mean(reference, b)}", "",
                  "| variant | " + " | ".join(m.replace("_", " ") for m in METRICS) + " |",
                  "|---|" + "---|" * len(METRICS)]
        for name, cells in vs.items():
            lines.append(f"| {name} | " + " | ".join(cell(Paired(**{k: c[k] for k in Paired.__dataclass_fields__}))
                                                   if c else "-" for c in cells.values()) + " |")
        lines.append("")
    lines += ["Commands:", "", f"- {args.reference}: {reference['command']}"]
    lines += [f"- {name}: {v['command']}" for name, v in variants.items()] + [""]
    (RESULTS / f"{out}.md").write_text("\n".join(lines))
    plot(table, RESULTS / f"{out}.png", args.reference)
    print("\n".join(lines))
    return 0


def same_base(data: str, record: str, other: str) -> None:
    """Refuse to pair two records whose base runs differ on a shared backbone and seed (another config, data or
    code): their seeds would not name the same starting point."""
    runs = [json.loads((RESULTS / f"{r}.json").read_text()) for r in (record, other)]
    bases = [{b: dict(zip(r["seeds"], vs["base"]["test_auc"], strict=True)) for b, vs in r["runs"].items()
              if "base" in vs} for r in runs]
    for b in set(bases[0]) & set(bases[1]):
        for seed in set(bases[0][b]) & set(bases[1][b]):
            x, y = bases[0][b][seed], bases[1][b][seed]
            if abs(x - y) > 1e-6:
                raise SystemExit(f"{record}.json and {other}.json trained different base models ({b}, seed {seed}: "
                                 f"test AUC {x:.6f} against {y:.6f}), so their runs cannot be paired by seed on {data}")


def fmt_mean(record: dict, backbone: str) -> str:
    m, s = mean_std(record["backbones"][backbone]["test_auc"])
    return f"{m:.4f} ± {s:.4f}"


if __name__ == "__main__":
    sys.exit(main())
