"""A control for LLaCTR and ELEC: a feature table of seeded random vectors, in place of the language model's.

    python -m benchmarks.random_field_table --like runs/features/ml-100k/field --out runs/features/ml-100k-random
    python -m benchmarks.quality --dataset ml-100k --backbones deepfm --variant llactr_random method.name=llactr \
        method.llactr.field_table=runs/features/ml-100k-random/field
    python -m benchmarks.random_field_table --like runs/features/ml-1m_cold-item-elec/user \
        --out runs/features/ml-1m_cold-item-elec-random      # ELEC's user (or item) table

The table has the same keys, size and dataset fingerprint as ``--like`` (so training accepts it), and
directions drawn from a standard normal with ``--seed``. A field table's vectors are L2-normalised like the
real ones; a user or item table (ELEC's) keeps each key's norm, so the gain network sees vectors of the real
scale that carry no text. Random vectors of 384 dimensions are nearly orthogonal: every field pair gets a
cosine similarity near 0. What LLaCTR or ELEC's gain network gains with such a table comes from its extra
capacity (the adaptor, the pairwise term, the late-fusion branch), not from language-model knowledge. The
metadata names the model ``random-control``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

from embedding_jobs.table_writer import write_table_file
from recsys.features.reader import read_file, table_files


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--like", required=True,
                   help="a field, user or item table (folder or file) whose keys and metadata to copy")
    p.add_argument("--out", required=True, help="features folder; the table goes to OUT/<entity>/table.parquet")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    files = table_files(args.like)
    meta, keys, real = read_file(files[0])
    if meta.entity not in ("field", "user", "item") or len(files) != 1:
        raise SystemExit(f"{args.like}: expected one merged field, user or item table, got entity {meta.entity!r} "
                         f"in {len(files)} files")
    vectors = np.random.default_rng(args.seed).standard_normal((len(keys), meta.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    if meta.entity != "field":  # the real vectors' norms
        vectors *= np.linalg.norm(np.asarray(real, dtype=np.float32), axis=1, keepdims=True)
    out = Path(args.out) / meta.entity
    out.mkdir(parents=True, exist_ok=True)
    control = dataclasses.replace(meta, model_name="random-control", model_path="", weights_hash=f"seed-{args.seed}")
    write_table_file(out / "table.parquet", keys, vectors, control)
    print(f"wrote {out / 'table.parquet'}: {len(keys)} random {meta.entity} vectors of dim {meta.dim} (seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
