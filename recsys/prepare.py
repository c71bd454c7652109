"""``python -m recsys.prepare``: turn a raw dataset into a prepared dataset (train/valid/test Parquet,
vocabularies, schema.json). See ``recsys.data.prepare`` for what is written."""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

from recsys.data.prepare import prepare
from recsys.data.schema import BUILTIN_SCHEMAS, SchemaError, load_schema
from recsys.data.sources import DataError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recsys.prepare", description=__doc__)
    p.add_argument("--dataset", required=True,
                   help=f"a built-in dataset ({', '.join(BUILTIN_SCHEMAS)}) or the path of a schema file (YAML/JSON)")
    p.add_argument("--out", required=True, type=Path, help="folder to write the prepared dataset into")
    p.add_argument("--raw", type=Path, default=None,
                   help="folder with the raw files (default: the schema's source.root; ml-100k: the recbole "
                        "package's copy; ml-1m: $RECSYS_DATA_DIR/ml-1m or ../shared/data/ml-1m)")
    p.add_argument("--seed", type=int, default=None, help="split seed (default: the schema's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    try:
        schema = load_schema(args.dataset)
        if args.seed is not None:
            from dataclasses import replace
            schema = replace(schema, split=replace(schema.split, seed=args.seed))
        start = time.perf_counter()
        prepared = prepare(schema, args.out, root=args.raw, progress=not args.no_progress)
    except (SchemaError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    c, st = prepared.counts, prepared.stats
    print(f"prepared {prepared.name} into {args.out} in {time.perf_counter() - start:.1f}s "
          f"(peak memory {peak_mb:.0f} MB, fingerprint {prepared.fingerprint})")
    print(f"  rows read {st['rows_read']:,}, dropped by the label rule {st['rows_dropped_by_label_rule']:,}, "
          f"labelled {sum(c.values()):,}")
    print(f"  split ({prepared.split_method}): " + ", ".join(
        f"{k} {v:,} ({st['positive_rate'][k]:.1%} positive)" for k, v in c.items()))
    for split, unknown in st["unknown_values"].items():
        if unknown:
            print(f"  {split}: unknown values mapped to <unk>: {unknown}")
    print("  fields: " + ", ".join(f"{f.name}[{f.vocab_size}]" for f in prepared.fields))
    return 0


if __name__ == "__main__":
    sys.exit(main())
