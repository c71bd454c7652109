"""A synthetic click log at industrial scale, written straight into the prepared-dataset format.

    python -m recsys.data.synthetic --rows 10000000 --out runs/data/synthetic-10m
    python -m recsys.data.synthetic --rows 2000000 --features 8 --table-size 1000000 --out runs/data/syn-8x1m

What it makes (Criteo-like by default):

- ``C1``..``Cn`` categorical fields with vocabularies log-spaced from ``--max-vocab`` down to ``--min-vocab``
  (or all ``--table-size``). ``C1`` is the user, ``C2`` the item, the rest context. The last ``--multi`` of
  them are multi-valued (1 to ``--max-values`` ids per row).
- ``I1``..``I13`` dense fields, standard normal (already normalised: transform ``none``).
- Ids Zipf-distributed with exponent ``--zipf``. The k-th most frequent value is id ``FIRST_ID + k``, so the
  vocabularies are in training-frequency order, as ``recsys.prepare`` writes them.
- Labels come from a hidden model, so that AUC means something. The logit is a bias, plus each field's
  weight for its id (a seeded hash of field and id, so nothing is held in memory), plus a linear term of the
  dense fields, plus a weight for the (user, item) pair. The test split keeps the hidden click probability
  (``p_true``): the AUC it gets is the best any model can reach.

The rows are a log in time order: the first 80% are train, the next 10% valid, the last 10% test. They
are made and written a chunk at a time, each chunk seeded by its split and index. So memory is bounded by one
chunk plus the per-table training counts (8 bytes per vocabulary row) whatever ``--rows`` is, and the same
arguments give the same bytes. Valid and test rows carry the regime columns (their user's and item's
training rows, the user key). Training rows do not: the counts are complete only once train is written. The
folder appears whole or not at all (``recsys.atomic``): an interrupted run leaves nothing to resume, and a
rerun starts again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from recsys.atomic import atomic_dir
from recsys.data.lists import Lists
from recsys.data.prepare import ROW_GROUP_SIZE, SPLITS
from recsys.data.schema import (
    FIRST_ID,
    ITEM_TRAIN_ROWS,
    USER_KEY,
    USER_TRAIN_ROWS,
    Entity,
    FieldKind,
    PreparedField,
    PreparedSchema,
)

GENERATOR_VERSION = 1
SPLIT_SHARES = (0.8, 0.1, 0.1)


@dataclass(frozen=True)
class SyntheticSpec:
    rows: int = 10_000_000
    features: int = 26  # categorical fields
    dense: int = 13
    multi: int = 3  # the last this many categorical fields are multi-valued
    max_values: int = 5
    min_vocab: int = 1_000
    max_vocab: int = 10_000_000
    table_size: int | None = None  # every field's vocabulary, instead of the log-spaced range
    zipf: float = 1.05
    seed: int = 0
    chunk_rows: int = 131_072
    name: str = "synthetic"

    def __post_init__(self) -> None:
        checks = [(self.rows >= 100, "--rows must be at least 100"),
                  (self.features >= 2, "--features must be at least 2 (the user and the item)"),
                  (0 <= self.multi <= self.features - 2, "--multi must leave C1 (user) and C2 (item) single-valued"),
                  (self.dense >= 0, "--dense must be >= 0"), (self.max_values >= 1, "--max-values must be >= 1"),
                  (1 <= self.min_vocab <= self.max_vocab, "--min-vocab must be between 1 and --max-vocab"),
                  (self.table_size is None or self.table_size >= 1, "--table-size must be >= 1"),
                  (self.zipf > 0 and self.zipf != 1.0, "--zipf must be positive and not 1"),
                  (self.chunk_rows >= 1, "--chunk-rows must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def vocab_sizes(self) -> list[int]:
        """Values per categorical field (without the padding and unknown ids), largest first."""
        if self.table_size is not None:
            return [self.table_size] * self.features
        exps = np.linspace(math.log10(self.max_vocab), math.log10(self.min_vocab), self.features)
        return [int(round(10 ** e)) for e in exps]

    def split_rows(self) -> list[int]:
        train, valid = int(self.rows * SPLIT_SHARES[0]), int(self.rows * SPLIT_SHARES[1])
        return [train, valid, self.rows - train - valid]

    def fingerprint(self) -> str:
        blob = json.dumps({"generator": GENERATOR_VERSION, **asdict(self)}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# splitmix64: a per-(field, id) weight from a hash, so the hidden model holds no table of 10^7 weights
_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    x = x + _GOLD
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _unit(key: np.ndarray) -> np.ndarray:
    """A hash as a float in [-sqrt(3), sqrt(3)): mean 0, variance 1."""
    return ((key >> np.uint64(11)).astype(np.float64) * 2.0 ** -53 * 2.0 - 1.0) * math.sqrt(3.0)


def id_weight(ids: np.ndarray, salt: int) -> np.ndarray:
    return _unit(_mix(ids.astype(np.uint64) ^ _mix(np.full(1, salt, np.uint64))))


def zipf_ids(rng: np.random.Generator, n: int, vocab: int, s: float) -> np.ndarray:
    """``n`` ids in [FIRST_ID, FIRST_ID + vocab) with P(k-th) proportional to (k + 1)^-s (inverse CDF of the
    continuous power law, floored: O(1) memory for any vocabulary)."""
    a = 1.0 - s
    x = (((vocab + 1.0) ** a - 1.0) * rng.random(n) + 1.0) ** (1.0 / a)
    return np.minimum(np.floor(x).astype(np.int64) - 1, vocab - 1) + FIRST_ID


class _HiddenModel:
    """The click model behind the labels: per-field id weights, a dense linear term, a (user, item) term."""

    FIELD_STD, DENSE_STD, PAIR_STD, BIAS = 1.5, 0.5, 0.5, -1.0

    def __init__(self, spec: SyntheticSpec) -> None:
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 999])
        self.dense_coef = rng.standard_normal(spec.dense) * self.DENSE_STD / math.sqrt(max(spec.dense, 1))
        self.field_scale = self.FIELD_STD / math.sqrt(spec.features)

    def logit(self, sparse: list[np.ndarray | Lists], dense: np.ndarray) -> np.ndarray:
        seed = self.spec.seed * 1_000
        z = np.full(len(dense), self.BIAS) + dense.astype(np.float64) @ self.dense_coef
        for f, col in enumerate(sparse):
            if isinstance(col, Lists):  # a multi-valued field: the mean of its ids' weights
                w = id_weight(col.values, seed + f)
                sums = np.add.reduceat(w, col.offsets[:-1]) if len(w) else np.zeros(len(col))
                z += self.field_scale * sums / np.diff(col.offsets)
            else:
                z += self.field_scale * id_weight(col, seed + f)
        pair = _mix(sparse[0].astype(np.uint64)) ^ sparse[1].astype(np.uint64)
        return z + self.PAIR_STD * id_weight(pair, seed + 777)


def _chunk(spec: SyntheticSpec, model: _HiddenModel, vocab: list[int], split: int, index: int,
           rows: int) -> tuple[list[np.ndarray | Lists], np.ndarray, np.ndarray]:
    rng = np.random.default_rng([spec.seed, split, index])
    sparse: list[np.ndarray | Lists] = []
    for f, v in enumerate(vocab):
        if f >= spec.features - spec.multi:
            lengths = rng.integers(1, spec.max_values + 1, rows)
            offsets = np.zeros(rows + 1, np.int64)
            np.cumsum(lengths, out=offsets[1:])
            sparse.append(Lists(offsets, zipf_ids(rng, int(offsets[-1]), v, spec.zipf)))
        else:
            sparse.append(zipf_ids(rng, rows, v, spec.zipf))
    dense = rng.standard_normal((rows, spec.dense)).astype(np.float32)
    p = 1.0 / (1.0 + np.exp(-model.logit(sparse, dense)))
    return sparse, dense, p


def _fields(spec: SyntheticSpec, vocab: list[int]) -> list[PreparedField]:
    out = []
    for f, v in enumerate(vocab):
        name = f"C{f + 1}"
        multi = f >= spec.features - spec.multi
        entity = Entity.USER if f == 0 else Entity.ITEM if f == 1 else Entity.CONTEXT
        what = "user id" if f == 0 else "item id" if f == 1 else "multi-valued context feature" if multi \
            else "context feature"
        out.append(PreparedField(
            name=name, kind=FieldKind.MULTI_CATEGORICAL if multi else FieldKind.CATEGORICAL, entity=entity,
            description=f"synthetic {what}, {v:,} Zipf({spec.zipf}) values", vocab_size=v + FIRST_ID,
            vocab_file=f"vocab/{name}.parquet", table=name, max_length=spec.max_values if multi else None))
    for d in range(spec.dense):
        out.append(PreparedField(name=f"I{d + 1}", kind=FieldKind.DENSE, entity=Entity.CONTEXT,
                                 description="synthetic dense feature, standard normal", vocab_size=0,
                                 vocab_file=None, table=f"I{d + 1}", transform={"kind": "none"}))
    return out


def generate(spec: SyntheticSpec, out: Path, progress: bool = True) -> PreparedSchema:
    """Write the synthetic dataset ``spec`` describes into ``out``; returns its prepared schema."""
    out = Path(out).resolve()
    if out.is_dir() and not (out / "schema.json").is_file() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists, is not empty and is not a prepared dataset: refusing to replace it")
    vocab = spec.vocab_sizes()
    model = _HiddenModel(spec)
    fields = _fields(spec, vocab)
    train_counts = [np.zeros(v + FIRST_ID, np.int64) for v in vocab]
    counts: dict[str, int] = {}
    stats: dict = {"rows_read": spec.rows, "rows_dropped_by_label_rule": 0, "positive_rate": {},
                   "unknown_values": {s: {} for s in SPLITS}, "skipped_fields": [], "regime_rows": {}}
    bar = tqdm(total=spec.rows, desc=f"generate {spec.name}", unit="row", unit_scale=True, disable=not progress)
    with atomic_dir(out) as tmp:
        (tmp / "vocab").mkdir()
        for split, (name, n) in enumerate(zip(SPLITS, spec.split_rows(), strict=True)):
            writer, positives, regimes = None, 0, {"cold_user": 0, "cold_item": 0, "long_tail": 0}
            for index, start in enumerate(range(0, n, spec.chunk_rows)):
                rows = min(spec.chunk_rows, n - start)
                sparse, dense, p = _chunk(spec, model, vocab, split, index, rows)
                label = (np.random.default_rng([spec.seed, split, index, 1]).random(rows) < p).astype(np.float32)
                positives += int(label.sum())
                columns: dict[str, pa.Array] = {"label": pa.array(label)}
                for f, col, seen in zip(fields, sparse, train_counts, strict=False):
                    columns[f.name] = col.to_arrow() if isinstance(col, Lists) else pa.array(col)
                    if name == "train":
                        seen += np.bincount(col.values if isinstance(col, Lists) else col, minlength=len(seen))
                for d in range(spec.dense):
                    columns[f"I{d + 1}"] = pa.array(dense[:, d])
                if name != "train":
                    user, item = train_counts[0][sparse[0]], train_counts[1][sparse[1]]
                    columns[USER_TRAIN_ROWS] = pa.array(user.astype(np.int32))
                    columns[ITEM_TRAIN_ROWS] = pa.array(item.astype(np.int32))
                    columns[USER_KEY] = pa.array(sparse[0])
                    regimes["cold_user"] += int((user == 0).sum())
                    regimes["cold_item"] += int((item == 0).sum())
                    regimes["long_tail"] += int(((item >= 1) & (item <= 5)).sum())
                if name == "test":
                    columns["p_true"] = pa.array(p.astype(np.float32))
                table = pa.table(columns)
                if writer is None:
                    writer = pq.ParquetWriter(tmp / f"{name}.parquet", table.schema, compression="zstd")
                writer.write_table(table, row_group_size=ROW_GROUP_SIZE)
                bar.update(rows)
            writer.close()
            counts[name] = n
            stats["positive_rate"][name] = round(positives / n, 6)
            if name != "train":
                stats["regime_rows"][name] = regimes
        for f, v, c in zip(fields, vocab, train_counts, strict=False):
            values = pa.concat_arrays([pa.array(["<pad>", "<unk>"]),
                                       pc.cast(pa.array(np.arange(v, dtype=np.int64)), pa.string())])
            pq.write_table(pa.table({"id": pa.array(np.arange(v + FIRST_ID, dtype=np.int64)), "value": values,
                                     "train_rows": pa.array(c)}), tmp / f.vocab_file, compression="zstd")
        prepared = PreparedSchema(
            name=spec.name, fingerprint=spec.fingerprint(), fields=tuple(fields), label="label",
            split_method="time", counts=counts, stats=stats,
            source={"format": "synthetic", "generator": {"version": GENERATOR_VERSION, **asdict(spec)},
                    "files": [], "has_timestamp": False, "split_ratios": list(SPLIT_SHARES),
                    "hidden_model": {"field_std": _HiddenModel.FIELD_STD, "dense_std": _HiddenModel.DENSE_STD,
                                     "pair_std": _HiddenModel.PAIR_STD, "bias": _HiddenModel.BIAS}})
        (tmp / "schema.json").write_text(prepared.to_json())
    out.chmod(0o755)
    bar.close()
    return prepared


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recsys.data.synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = SyntheticSpec()
    p.add_argument("--out", required=True, type=Path, help="folder to write the prepared dataset into")
    p.add_argument("--rows", type=int, default=d.rows, help=f"rows in all (default {d.rows:,}; 80/10/10 split)")
    p.add_argument("--features", type=int, default=d.features, help="categorical fields (default %(default)s)")
    p.add_argument("--dense", type=int, default=d.dense, help="dense fields (default %(default)s)")
    p.add_argument("--multi", type=int, default=d.multi, help="multi-valued fields among them (default %(default)s)")
    p.add_argument("--max-values", type=int, default=d.max_values, help="ids per multi-valued row, at most")
    p.add_argument("--min-vocab", type=int, default=d.min_vocab, help="the smallest vocabulary (default %(default)s)")
    p.add_argument("--max-vocab", type=int, default=d.max_vocab, help="the largest vocabulary (default %(default)s)")
    p.add_argument("--table-size", type=int, default=None, help="give every field this vocabulary instead")
    p.add_argument("--zipf", type=float, default=d.zipf, help="Zipf exponent of the ids (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--chunk-rows", type=int, default=d.chunk_rows, help="rows made and written at a time")
    p.add_argument("--name", default=d.name, help="the dataset's name in schema.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = vars(p.parse_args(argv))
    out, progress = args.pop("out"), not args.pop("no_progress")
    try:
        spec = SyntheticSpec(**args)
        start = time.perf_counter()
        prepared = generate(spec, out, progress=progress)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from recsys.prepare import summary

    print(summary(prepared, out, time.perf_counter() - start,
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    return 0


if __name__ == "__main__":
    sys.exit(main())
