"""What LLaCTR's field tables say about the fields: the cosine similarity of every field pair (a heatmap per
table) and the held-out field accuracy of the fine-tuning that made the fine-tuned one.

    python -m embedding_jobs.run --entity field --dataset runs/data/ml-1m_cold-item \
        --out runs/features/ml-1m_cold-item-untuned                     # the packaged MiniLM, not fine-tuned
    python -m benchmarks.field_similarity --dataset runs/data/ml-1m_cold-item \
        --table fine-tuned=runs/features/ml-1m_cold-item/field \
        --table untuned=runs/features/ml-1m_cold-item-untuned/field \
        --table random=runs/features/ml-1m_cold-item-random/field \
        --report runs/models/ml-1m_cold-item-fields/report.json

Several fine-tunings (one per language model) go in one record: ``--report NAME=PATH`` names the table each
report made, for example ``--report minilm=runs/models/ml-100k-fields/report.json --report
smollm2=runs/models/ml-100k-smollm2-fields/report.json``.

FIE turns exactly these similarities into pair weights (``w = A s + b``): a table whose pairs all look alike
gives FIE nothing to work with beyond its adaptor. Per table the record gives the mean and the spread of
the off-diagonal similarities. Results: benchmarks/results/field_similarity_<data>.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, environment, write_json
from recsys.data.schema import PreparedSchema
from recsys.features import load_feature_table


def similarity(vectors: np.ndarray) -> np.ndarray:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return unit @ unit.T


def off_diagonal(matrix: np.ndarray) -> np.ndarray:
    return matrix[~np.eye(len(matrix), dtype=bool)]


def plot(matrices: dict[str, np.ndarray], fields: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(matrices), figsize=(4.6 * len(matrices), 4.4), squeeze=False)
    for ax, (name, m) in zip(axes[0], matrices.items(), strict=True):
        image = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_title(name)
        ax.set_xticks(range(len(fields)), fields, rotation=90, fontsize=7)
        ax.set_yticks(range(len(fields)), fields, fontsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="cosine similarity")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="the prepared dataset the tables were made for")
    p.add_argument("--table", action="append", required=True, metavar="NAME=PATH",
                   help="a field table and the name it goes by in the record; repeat")
    p.add_argument("--report", action="append", default=[], metavar="[NAME=]PATH",
                   help="field_finetune's report.json (held-out accuracy before and after), under the name of the "
                        "table it made (default fine-tuned); repeat for several models")
    args = p.parse_args()
    schema = PreparedSchema.load(args.dataset)
    fields = [f.name for f in schema.fields]
    matrices, summary = {}, {"dataset": args.dataset, "fields": fields, "tables": {}}
    for spec in args.table:
        name, sep, path = spec.partition("=")
        if not sep:
            p.error(f"--table {spec!r}: expected NAME=PATH")
        table = load_feature_table(path, expect_fingerprint=schema.fingerprint, expect_entity="field",
                                   num_rows=len(fields))
        m = similarity(table.embeddings.double().numpy())
        off = off_diagonal(m)
        matrices[name] = m
        summary["tables"][name] = {"path": path, "model": table.metadata.model_name, "mean": float(off.mean()),
                                   "std": float(off.std()), "min": float(off.min()), "max": float(off.max()),
                                   "matrix": np.round(m, 4).tolist()}
    for spec in args.report:
        name, sep, path = spec.partition("=")
        name, path = (name, path) if sep else ("fine-tuned", spec)
        if name not in summary["tables"]:
            p.error(f"--report {spec!r}: no --table is named {name!r} (the report belongs to the table it made)")
        report = json.loads(Path(path).read_text())
        summary.setdefault("fine_tuning", {})[name] = {
            **{k: report[k] for k in ("accuracy_before", "accuracy_after", "chance", "train_pairs", "heldout_pairs",
                                      "steps", "train_seconds", "stopped_by_time_budget", "prompt", "pooling")
               if k in report},
            "model": "/".join(Path(str(report.get("model"))).parts[-2:]), "batch_size": report.get("options", {}).get("batch_size"),
            "time_budget_s": report.get("options", {}).get("time_budget_s"), "report": path}
    summary["environment"] = environment()
    data = Path(args.dataset).name
    out = RESULTS / f"field_similarity_{data}"
    write_json(out.with_name(out.name + ".json"), summary)
    plot(matrices, fields, out.with_name(out.name + ".png"))
    lines = [f"# Field similarities of LLaCTR's field tables: {data}", "",
             "Cosine similarity of every pair of the dataset's fields, per table (heatmaps: "
             f"`{out.name}.png`). Command: `python -m benchmarks.field_similarity " +
             " ".join(f"--table {t}" for t in args.table) + f" --dataset {args.dataset}" +
             "".join(f" --report {r}" for r in args.report) + "`", "",
             "| table | model | mean | std | min | max |", "|---|---|---|---|---|---|"]
    for name, s in summary["tables"].items():
        lines.append(f"| {name} | {s['model']} | {s['mean']:.3f} | {s['std']:.3f} | {s['min']:.3f} | {s['max']:.3f} |")
    if "fine_tuning" in summary:
        lines += ["", "Held-out field accuracy of the fine-tuning (which of the fields a value belongs to, on values "
                      "held out of its training pairs):", "",
                  "| table | base model | query (pooling) | held-out pairs | chance | before | after | steps "
                  "(batch) | train s | stopped by the time budget |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name, f in summary["fine_tuning"].items():
            lines.append(f"| {name} | {f['model']} | {f.get('prompt')} ({f.get('pooling')}) | {f.get('heldout_pairs')} "
                         f"| {f.get('chance', 0):.3f} | {f['accuracy_before']:.3f} | **{f['accuracy_after']:.3f}** | "
                         f"{f.get('steps')} ({f.get('batch_size')}) | {f.get('train_seconds', 0):.0f} | "
                         f"{f.get('stopped_by_time_budget')} |")
    (out.with_name(out.name + ".md")).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
