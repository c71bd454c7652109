"""``python -m recsys.prepare``: turn a raw dataset into a prepared dataset (train/valid/test Parquet,
vocabularies, schema.json). See ``recsys.data.prepare`` for what is written.

    python -m recsys.prepare --dataset ml-100k --out runs/data/ml-100k
    python -m recsys.prepare --dataset ml-1m --split cold_item --out runs/data/ml-1m-cold-item
    python -m recsys.prepare --dataset ml-1m --train-fraction 0.05 --out runs/data/ml-1m-sparse-5pct
    python -m recsys.prepare --dataset my_schema.yaml --out runs/data/mine     # your own CSV or Parquet files

The schema format for your own data (every key, examples, what each error means): docs/datasets.md;
a complete example: docs/examples/reviews.yaml.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

from recsys.data.prepare import prepare
from recsys.data.schema import (
    BUILTIN_SCHEMAS,
    SPLIT_METHODS,
    PreparedSchema,
    SchemaError,
    load_schema,
    validate,
)
from recsys.data.sources import DataError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recsys.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True,
                   help=f"a built-in dataset ({', '.join(BUILTIN_SCHEMAS)}) or the path of a schema file (YAML/JSON)")
    p.add_argument("--out", required=True, type=Path, help="folder to write the prepared dataset into")
    p.add_argument("--raw", type=Path, default=None,
                   help="folder with the raw files (default: the schema's source.root; ml-100k: the recbole "
                        "package's copy; ml-1m: $RECSYS_DATA_DIR/ml-1m or ../shared/data/ml-1m)")
    p.add_argument("--seed", type=int, default=None, help="split seed (default: the schema's)")
    p.add_argument("--split", choices=SPLIT_METHODS, default=None,
                   help="split method (default: the schema's): auto (time where there are timestamps), time, "
                        "random, or cold_item / cold_user (a fraction of the items / users held out entirely, "
                        "their rows in valid and test)")
    p.add_argument("--holdout-fraction", type=float, default=None,
                   help="cold_item / cold_user: the fraction of items / users held out (default 0.1)")
    p.add_argument("--train-fraction", type=float, default=None,
                   help="keep a seeded fraction of the training rows (the sparse-data regime); valid and test "
                        "keep theirs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    try:
        schema = load_schema(args.dataset)
        changes = {k: v for k, v in (("seed", args.seed), ("method", args.split),
                                     ("holdout_fraction", args.holdout_fraction),
                                     ("train_fraction", args.train_fraction)) if v is not None}
        if changes:
            schema = replace(schema, split=replace(schema.split, **changes))
            validate(schema)
        start = time.perf_counter()
        prepared = prepare(schema, args.out, root=args.raw, progress=not args.no_progress)
    except (SchemaError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(prepared, args.out, time.perf_counter() - start,
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    return 0


def summary(prepared: PreparedSchema, out: Path, seconds: float, peak_mb: float) -> str:
    """What a prepared dataset holds, for the person who made it: splits, regimes, unknown values, fields."""
    lines: list[str] = []
    c, st = prepared.counts, prepared.stats
    lines.append(f"prepared {prepared.name} into {out} in {seconds:.1f}s "
                 f"(peak memory {peak_mb:.0f} MB, fingerprint {prepared.fingerprint})")
    lines.append(f"  rows read {st['rows_read']:,}, dropped by the label rule {st['rows_dropped_by_label_rule']:,}, "
                 f"labelled {st['rows_read'] - st['rows_dropped_by_label_rule']:,}")
    if prepared.source.get("train_fraction", 1.0) < 1:
        lines.append(f"  training rows subsampled: {c['train']:,} of {prepared.source['train_rows_before_subsample']:,} "
                     f"(train_fraction {prepared.source['train_fraction']})")
    lines.append(f"  split ({prepared.split_method}): " + ", ".join(
        f"{k} {v:,} ({st['positive_rate'][k]:.1%} positive)" for k, v in c.items()))
    for split in ("valid", "test"):
        regimes = st["regime_rows"].get(split, {})
        if regimes:
            lines.append(f"  {split} rows by regime: " + ", ".join(
                f"{k.replace('_', ' ')} {v:,} ({v / c[split]:.0%})" for k, v in regimes.items()))
    for split, unknown in st["unknown_values"].items():
        if unknown:
            lines.append(f"  {split}: unknown values mapped to <unk>: {unknown}")
    lines.append("  fields: " + ", ".join(f"{f.name}[{f.vocab_size}]" for f in prepared.fields))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
