"""SRP4CTR's pre-training on its own terms: masked-item hit rate at 10 and masked side-field accuracy on the
validation rows' histories, against a popularity baseline, per seed.

    python -m benchmarks.srp4ctr_pretrain --dataset ml-100k --backbones deepfm

Reads the pre-training stage of ``benchmarks.quality``'s ``srp_both`` runs (the best epoch's validation figures,
``runs/bench/<run>/stages/pretrain/metrics.json``; train them with ``bash benchmarks/regime_records.sh
srp4ctr``). The baseline predicts, for every masked position, the 10 items (and the one side value) most
frequent in the training rows' histories; it is scored on every position of the validation rows' histories,
which is what random masks sample. On ML-100K's time split most validation rows belong to users with no
training row, so these are held-out users. Results: benchmarks/results/srp4ctr_pretrain_<dataset>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from benchmarks.common import REPO, RESULTS, environment, environment_line, fmt, write_json
from benchmarks.quality import SEEDS, prepare_data, run_name
from recsys.data.schema import FIRST_ID, PreparedSchema
from recsys.methods.srp4ctr import sequence_fields


def _values(split_file, column: str) -> np.ndarray:
    ids = pc.list_flatten(pq.read_table(split_file, columns=[column]).column(column)).to_numpy()
    return ids[ids >= FIRST_ID]


def popularity(data, schema: PreparedSchema) -> dict[str, float]:
    """Top-10 item hit rate and majority-class accuracy of each side field, trained on train histories."""
    f = sequence_fields(schema)
    out = {}
    for name in f.all:
        train, valid = _values(data / "train.parquet", name), _values(data / "valid.parquet", name)
        counts = np.bincount(train, minlength=schema.field(name).vocab_size)
        k = 10 if name == f.item_history else 1
        top = np.argsort(-counts, kind="stable")[:k]
        key = "item_hit10" if name == f.item_history else f"{name}_accuracy"
        out[key] = float(np.isin(valid, top).mean())
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-100k", choices=["ml-100k"])
    p.add_argument("--backbones", nargs="+", default=["deepfm"],
                   help="backbones whose srp_both runs pre-trained (regime_records.sh: DeepFM's only)")
    p.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    args = p.parse_args()
    data = prepare_data(args.dataset)
    schema = PreparedSchema.load(data)
    base = popularity(data, schema)
    runs = {}
    for b in args.backbones:
        per_seed = []
        for s in args.seeds:
            path = REPO / "runs" / "bench" / run_name(args.dataset, b, s, "srp_both") / "stages" / "pretrain" / "metrics.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: run `bash benchmarks/regime_records.sh srp4ctr` first")
            m = json.loads(path.read_text())
            best = next(h for h in m["history"] if h["epoch"] == m["best_epoch"])
            per_seed.append({k.removeprefix("valid_"): v for k, v in best.items() if k.startswith("valid_")}
                            | {"epochs": len(m["history"]), "best_epoch": m["best_epoch"]})
        runs[b] = per_seed
    metrics = list(base)
    summary = {"dataset": args.dataset, "seeds": args.seeds, "popularity": base, "runs": runs,
               "command": "python -m benchmarks.srp4ctr_pretrain " + " ".join(sys.argv[1:]),
               "environment": environment()}
    stem = RESULTS / f"srp4ctr_pretrain_{args.dataset}"
    write_json(stem.with_suffix(".json"), summary)
    lines = [f"# SRP4CTR pre-training on {args.dataset}", "",
             f"Command: `{summary['command']}`; the pre-training stage of the `srp_both` runs, seeds {args.seeds} "
             "(best epoch by validation hit@10), on the validation rows' histories; the popularity baseline "
             "predicts the most frequent training-history values.", "",
             "| model | " + " | ".join(metrics) + " | epochs |", "|---|" + "---|" * (len(metrics) + 1),
             "| popularity | " + " | ".join(f"{base[m]:.4f}" for m in metrics) + " | |"]
    for b, rs in runs.items():
        lines.append(f"| encoder ({b} run) | " + " | ".join(fmt([r[m] for r in rs]) for m in metrics)
                     + f" | {[r['epochs'] for r in rs]} |")
    env = summary["environment"]
    lines += ["", environment_line(env, packages=False), ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
