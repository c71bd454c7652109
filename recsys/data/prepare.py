"""Raw dataset + schema -> prepared dataset (DESIGN.md contract 1).

Output folder::

    train.parquet valid.parquet test.parquet   label, one column per field (ids), rating/timestamp kept for
                                               the language-model side, and the regime columns (never model
                                               inputs): the training rows of the row's user and of its item,
                                               and the raw user as a number (for GAUC)
    vocab/<field>.parquet                      id -> raw value (and readable text where the schema gives it),
                                               and how often the id occurs in the training rows (train_rows)
    schema.json                                fields, vocabulary sizes, counts, split method, fingerprint

Vocabularies: a field's values in the training split, plus every value of its side table (the catalogue of
users or items is known up front and holds no labels). Values are ordered by training frequency, then by
value. Id 0 is padding and id 1 is the unknown value: validation and test values outside the vocabulary
map to it and are counted. Preparation is deterministic: the same inputs, schema and seed give the same
bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from recsys.atomic import atomic_dir
from recsys.data.lists import Lists
from recsys.data.schema import (
    FIRST_ID,
    ITEM_TRAIN_ROWS,
    UNK_ID,
    USER_KEY,
    USER_TRAIN_ROWS,
    DatasetSchema,
    FieldKind,
    FieldSpec,
    Normalize,
    PreparedField,
    PreparedSchema,
)
from recsys.data.sources import DataError, RawTables, line_of, read_source, to_number

log = logging.getLogger(__name__)

PREPARE_VERSION = 2  # 2: regime columns, train_rows in the vocabularies, cold-entity splits, train_fraction
SPLITS = ("train", "valid", "test")
ROW_GROUP_SIZE = 65_536


def split_tokens(values: pd.Series, separator: str) -> Lists:
    """'a|b|c' strings -> Lists of tokens; empty strings give empty lists."""
    parts = values.fillna("").str.split(separator, regex=False)
    parts = parts.map(lambda xs: [x.strip() for x in xs if x.strip()])
    lengths = parts.map(len).to_numpy(dtype=np.int64)
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.array([t for xs in parts for t in xs], dtype=object)
    return Lists(offsets, flat)


class Vocabulary:
    """Raw value <-> id. Ids start at FIRST_ID; 0 is padding and 1 is unknown."""

    def __init__(self, values: list[str]) -> None:
        self.values = values
        self._index = pd.Index(values)

    @classmethod
    def build(cls, train_tokens: np.ndarray, catalogue: np.ndarray | None) -> Vocabulary:
        counts = pd.Series(train_tokens, dtype=object).value_counts()
        if catalogue is not None:
            extra = pd.Index(pd.unique(pd.Series(catalogue, dtype=object))).difference(counts.index)
            counts = pd.concat([counts, pd.Series(0, index=extra)])
        order = pd.DataFrame({"value": counts.index.astype(str), "count": counts.to_numpy()})
        order = order[order["value"] != ""].sort_values(["count", "value"], ascending=[False, True], kind="stable")
        return cls(order["value"].tolist())

    def __len__(self) -> int:  # the embedding table's size: values plus the two reserved ids
        return len(self.values) + FIRST_ID

    def encode(self, tokens: np.ndarray) -> tuple[np.ndarray, int]:
        """Ids for raw tokens, and how many were unknown (mapped to UNK_ID)."""
        pos = self._index.get_indexer(pd.Index(tokens, dtype=object)) if len(tokens) else np.zeros(0, np.int64)
        unknown = pos < 0
        ids = np.where(unknown, UNK_ID, pos + FIRST_ID).astype(np.int64)
        return ids, int(unknown.sum())


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(schema: DatasetSchema, raw: RawTables) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"prepare_version": PREPARE_VERSION, "schema": schema.to_dict()}, sort_keys=True).encode())
    for f in raw.files:
        h.update(f.name.encode() + b"\0" + _sha256_file(f).encode())
    return h.hexdigest()[:16]


def _labels(schema: DatasetSchema, raw: RawTables) -> tuple[np.ndarray, np.ndarray]:
    """Label per interaction (NaN where the rule drops the row)."""
    rule = schema.label
    values = to_number(raw.interactions, rule.column, "a number (the label column)", raw.column_name(rule.column))
    if rule.binary:
        bad = np.flatnonzero((values != 0) & (values != 1))
        if bad.size:
            i = int(bad[0])
            raise DataError(f"{raw.interactions.attrs.get('path')}, line {line_of(raw.interactions, i)}, column "
                            f"{rule.column!r}: {values[i]:g} is not 0 or 1, which label.binary asks for "
                            f"({bad.size} such rows)")
        return values.astype(np.float64), values
    out_of_range = np.zeros(values.shape, dtype=bool)
    if rule.min_value is not None:
        out_of_range |= values < rule.min_value
    if rule.max_value is not None:
        out_of_range |= values > rule.max_value
    if out_of_range.any():
        i = int(np.flatnonzero(out_of_range)[0])
        line = line_of(raw.interactions, i)
        raise DataError(f"{raw.interactions.attrs.get('path')}, line {line}, column {rule.column!r}: "
                        f"{values[i]:g} is outside the label rule's range [{rule.min_value}, {rule.max_value}] "
                        f"({int(out_of_range.sum())} such rows)")
    label = np.full(values.shape, np.nan)
    label[values > rule.positive_above] = 1.0
    label[values < rule.negative_below] = 0.0
    return label, values


def _ordered(method: str, rows: np.ndarray, timestamps: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    return rows[np.argsort(timestamps[rows], kind="stable")] if method == "time" else rows[rng.permutation(len(rows))]


def _split(schema: DatasetSchema, keep: np.ndarray, timestamps: np.ndarray | None,
           raw: RawTables) -> tuple[str, list[np.ndarray], np.ndarray]:
    """The split's name, its (train, valid, test) rows, and the whole training split before any subsample."""
    rule = schema.split
    method = rule.method
    base = "time" if timestamps is not None else "random"
    if method == "time" and timestamps is None:
        raise DataError(f"{schema.where}: split.method is 'time' but the source has no timestamps")
    if method in ("time", "random"):
        base = method
    rng = np.random.default_rng(rule.seed)
    held = np.zeros(0, dtype=np.int64)
    if method in ("cold_item", "cold_user"):
        column = "item_id" if method == "cold_item" else "user_id"
        if column not in raw.interactions.columns:
            raise DataError(f"{schema.where}: split.method {method!r} needs a {column} column in the interactions")
        entity = raw.interactions[column].astype(str).to_numpy(dtype=object)[keep]
        uniq = np.unique(entity)
        chosen = np.random.default_rng([rule.seed, 1]).choice(
            len(uniq), max(1, round(len(uniq) * rule.holdout_fraction)), replace=False)
        is_held = np.isin(entity, uniq[chosen])
        held, keep = keep[is_held], keep[~is_held]
        held = held[np.random.default_rng([rule.seed, 2]).permutation(len(held))]
    order = _ordered(base, keep, timestamps, rng)
    n = len(order)
    n_train = int(n * rule.ratios[0])
    n_valid = int(n * rule.ratios[1])
    half = len(held) // 2
    parts = [order[:n_train], np.concatenate([order[n_train:n_train + n_valid], held[:half]]),
             np.concatenate([order[n_train + n_valid:], held[half:]])]
    for name, part in zip(SPLITS, parts, strict=True):
        if len(part) == 0:
            raise DataError(f"{schema.where}: the {name} split is empty ({n + len(held)} labelled rows); "
                            "the dataset is too small for the split ratios")
    full_train = parts[0]
    if rule.train_fraction < 1:  # keeps the training rows' order (time order, where the split is by time)
        take = np.random.default_rng([rule.seed, 3]).choice(
            len(full_train), max(1, round(len(full_train) * rule.train_fraction)), replace=False)
        parts[0] = full_train[np.sort(take)]
    name = base if method == "auto" else method if method in ("time", "random") else f"{method} ({base})"
    return name, parts, full_train


def _regime_columns(raw: RawTables, train_rows: np.ndarray) -> dict[str, np.ndarray]:
    """Per interaction: its user's and its item's number of training rows, and the raw user as a number."""
    out = {}
    for column, name in (("user_id", USER_TRAIN_ROWS), ("item_id", ITEM_TRAIN_ROWS)):
        if column not in raw.interactions.columns:
            continue
        codes = pd.factorize(raw.interactions[column].astype(str).to_numpy(dtype=object))[0]
        counts = np.bincount(codes[train_rows], minlength=codes.max(initial=0) + 1)
        out[name] = counts[codes].astype(np.int32)
        if column == "user_id":
            out[USER_KEY] = codes.astype(np.int64)
    return out


def regime_summary(columns: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, int]:
    """Rows of a split per regime (cold users, cold items, the long tail), for the preparation summary."""
    out = {}
    if USER_TRAIN_ROWS in columns:
        out["cold_user"] = int((columns[USER_TRAIN_ROWS][rows] == 0).sum())
    if ITEM_TRAIN_ROWS in columns:
        item = columns[ITEM_TRAIN_ROWS][rows]
        out["cold_item"] = int((item == 0).sum())
        out["long_tail"] = int(((item >= 1) & (item <= 5)).sum())
    return out


def _entity_index(raw: RawTables, table: pd.DataFrame | None, key: str) -> np.ndarray:
    """Row of ``table`` for each interaction; -1 where the side table lacks the key."""
    if table is None:
        return np.full(len(raw.interactions), -1, dtype=np.int64)
    dupes = table[key].duplicated()
    if dupes.any():
        i = int(np.flatnonzero(dupes.to_numpy())[0])
        raise DataError(f"{table.attrs.get('path')}, line {line_of(table, i)}: "
                        f"duplicate {key} {table[key].iloc[i]!r}")
    return pd.Index(table[key]).get_indexer(raw.interactions[key])


class _Columns:
    """Raw per-interaction tokens of a field, resolved through the side tables."""

    def __init__(self, raw: RawTables) -> None:
        self.raw = raw
        self.user_idx = _entity_index(raw, raw.users, "user_id")
        self.item_idx = _entity_index(raw, raw.items, "item_id")

    def locate(self, column: str, where: str) -> tuple[pd.DataFrame, np.ndarray | None]:
        """The table holding ``column`` and the per-interaction row index into it (None: interactions)."""
        if column in self.raw.interactions.columns:
            return self.raw.interactions, None
        for table, idx in ((self.raw.users, self.user_idx), (self.raw.items, self.item_idx)):
            if table is not None and column in table.columns:
                return table, idx
        cols = sorted(set(self.raw.interactions.columns) | set(self.raw.users.columns if self.raw.users is not None
                      else []) | set(self.raw.items.columns if self.raw.items is not None else []))
        raise DataError(f"{where}: column {column!r} is in none of the source tables; columns are {cols}")

    def lists(self, column: str, separator: str | None, where: str) -> tuple[Lists, np.ndarray | None]:
        """Per-interaction token lists, and the catalogue: every value of the column in a side table
        (a user or item table also lists users and items that have no training interactions)."""
        table, idx = self.locate(column, where)
        own = self._tokens(table[column], separator)
        catalogue = None
        for side in (self.raw.users, self.raw.items):
            if side is not None and column in side.columns:
                catalogue = (own if side is table else self._tokens(side[column], separator)).values
        if idx is None:
            return own, catalogue
        # One extra entity at the end for interactions whose user or item is missing from the side table:
        # no values for a multi-valued field, the empty (hence unknown) value for a single-valued one.
        if separator:
            padded = Lists(np.append(own.offsets, own.offsets[-1]), own.values)
        else:
            padded = Lists(np.append(own.offsets, own.offsets[-1] + 1), np.append(own.values, ""))
        return padded.take(np.where(idx < 0, len(table), idx)), catalogue

    @staticmethod
    def _tokens(values: pd.Series, separator: str | None) -> Lists:
        if separator:
            return split_tokens(values, separator)
        return Lists(np.arange(len(values) + 1, dtype=np.int64), values.fillna("").to_numpy(dtype=object))


def _history(raw: RawTables, timestamps: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """For each interaction: the (start, length) of its history in ``order``, the interactions sorted by
    user then time. A history holds only interactions with a strictly earlier timestamp, the last
    ``max_length`` of them, oldest first: never the row itself, never a tie, never a later one.
    """
    users = raw.interactions["user_id"].to_numpy(dtype=object)
    user_codes = pd.factorize(users)[0]
    order = np.lexsort((np.arange(len(users)), timestamps, user_codes))
    su, st = user_codes[order], timestamps[order]
    pos = np.arange(len(order), dtype=np.int64)
    new_user = np.r_[True, su[1:] != su[:-1]]
    new_time = new_user | np.r_[True, st[1:] != st[:-1]]
    group_start = np.maximum.accumulate(np.where(new_user, pos, 0))
    end = np.maximum.accumulate(np.where(new_time, pos, 0))  # exclusive: this user's strictly earlier rows
    start = np.maximum(group_start, end - max_length)
    starts = np.empty(len(users), dtype=np.int64)
    lengths = np.empty(len(users), dtype=np.int64)
    starts[order], lengths[order] = start, end - start
    return order, np.stack([starts, lengths])


def _normalize(values: np.ndarray, f: FieldSpec, train_rows: np.ndarray, where: str) -> tuple[np.ndarray, dict]:
    """A dense field's model inputs and the transform that made them (fitted on the training rows)."""
    kind = Normalize(f.normalize)
    out = values.astype(np.float64)
    transform: dict = {"kind": kind.value}
    if kind in (Normalize.LOG1P, Normalize.LOG1P_STANDARD):
        if (out <= -1).any():
            raise DataError(f"{where}: normalize {kind.value} needs values above -1; the smallest is {out.min():g}")
        out = np.log1p(out)
    if kind in (Normalize.STANDARD, Normalize.LOG1P_STANDARD):
        mean, std = float(out[train_rows].mean()), float(out[train_rows].std())
        std = std if std > 0 else 1.0  # a constant field stays at 0
        out = (out - mean) / std
        transform |= {"mean": mean, "std": std}
    return out.astype(np.float32), transform


def _check_classes(schema: DatasetSchema, label: np.ndarray, parts: list[np.ndarray]) -> None:
    """Every split needs clicks and non-clicks: with one class nothing can be learned or measured."""
    for name, rows in zip(SPLITS, parts, strict=True):
        positives = int(label[rows].sum())
        if positives in (0, len(rows)):
            rule = schema.label
            how = ("label.binary: 1 is a click" if rule.binary else
                   f"values of {rule.column!r} above {rule.positive_above:g} are clicks, below "
                   f"{rule.negative_below:g} non-clicks")
            raise DataError(f"{schema.where}: the {name} split has one class ({len(rows):,} rows, all "
                            f"{'clicks' if positives else 'non-clicks'}) under the label rule ({how}); a 0/1 "
                            f"column needs `label: {{column: {rule.column}, binary: true}}`")


def _check_keys_known(schema: DatasetSchema, unknown: dict[str, dict[str, int]], counts: dict[str, int]) -> None:
    """An id column whose every validation and test value is unknown was not read as the training rows were."""
    for key, entity in (("user_id", "user"), ("item_id", "item")):
        if schema.split.method == f"cold_{entity}":
            continue  # held out on purpose
        for f in schema.fields:
            if f.column != key or f.kind is not FieldKind.CATEGORICAL:
                continue
            n = sum(counts[s] for s in ("valid", "test"))
            if sum(unknown.get(s, {}).get(f.name, 0) for s in ("valid", "test")) == n:
                raise DataError(f"{schema.where}: field {f.name!r}: every one of the {n:,} validation and test "
                                f"values is unknown to the vocabulary of the training rows and side tables; the "
                                "ids are not read alike in every file (a byte-order mark, another id format, a "
                                "column read as a number?)")


def prepare(schema: DatasetSchema, out: Path, root: Path | None = None, progress: bool = True) -> PreparedSchema:
    """Prepare a dataset into ``out``. Returns the prepared schema that was written."""
    out = Path(out).resolve()
    _check_replaceable(out)  # before any work: a refused folder costs nothing and leaves nothing
    stages = tqdm(total=6, desc=f"prepare {schema.name}", disable=not progress, unit="stage")
    stages.set_postfix_str("reading")
    raw = read_source(schema, root)
    fp = fingerprint(schema, raw)
    n_all = len(raw.interactions)
    stages.update()

    stages.set_postfix_str("labels and split")
    label, rating = _labels(schema, raw)
    keep = np.flatnonzero(~np.isnan(label))
    timestamps = (to_number(raw.interactions, "timestamp", "a timestamp", raw.column_name("timestamp"))
                  if raw.has_timestamp else None)
    split_method, parts, full_train = _split(schema, keep, timestamps, raw)
    _check_classes(schema, label, parts)
    regimes = _regime_columns(raw, parts[0])
    stages.update()

    stages.set_postfix_str("fields")
    cols = _Columns(raw)
    fields = list(schema.fields)
    seq_fields = [f for f in fields if f.kind is FieldKind.SEQUENCE]
    skipped = []
    if seq_fields and timestamps is None:
        skipped = [f.name for f in seq_fields]
        log.warning("%s: no timestamps in the source, so behaviour histories cannot be ordered: "
                    "skipping sequence fields %s", schema.name, skipped)
        fields = [f for f in fields if f.kind is not FieldKind.SEQUENCE]
    tokens: dict[str, Lists] = {}  # per-interaction token lists of every categorical and sequence field
    catalogue: dict[str, np.ndarray] = {}
    dense: dict[str, np.ndarray] = {}
    transforms: dict[str, dict] = {}
    texts: dict[str, np.ndarray] = {}
    for f in fields:
        where = f"{schema.where}: field {f.name!r}"
        if f.kind is FieldKind.DENSE:
            table, idx = cols.locate(f.column, where)
            v = to_number(table, f.column)
            v = v if idx is None else np.where(idx < 0, 0.0, v[np.maximum(idx, 0)])
            dense[f.name], transforms[f.name] = _normalize(v, f, parts[0], where)
        elif f.kind is FieldKind.TEXT:
            table, idx = cols.locate(f.column, where)
            v = table[f.column].fillna("").to_numpy(dtype=object)
            texts[f.name] = v if idx is None else np.where(idx < 0, "", v[np.maximum(idx, 0)])
        elif f.kind is not FieldKind.SEQUENCE:
            sep = f.separator if f.kind is FieldKind.MULTI_CATEGORICAL else None
            tokens[f.name], cat = cols.lists(f.column, sep, where)
            if cat is not None:
                catalogue[f.name] = cat
    history_span = None
    if seq_fields and timestamps is not None:
        order, history_span = _history(raw, timestamps, schema.history_length)
        for f in seq_fields:
            tokens[f.name] = _history_tokens(f, cols, tokens, order, history_span, schema)
    stages.update()

    stages.set_postfix_str("vocabularies")
    train_rows = full_train  # a subsampled training split keeps every id: its unseen ones map to <unk> at load
    vocabs: dict[str, Vocabulary] = {}
    for f in fields:
        if f.kind in (FieldKind.DENSE, FieldKind.TEXT) or f.share_vocab is not None:
            continue
        users_of = [g for g in fields if g.share_vocab == f.name]
        train_tokens = [tokens[g.name].take(train_rows).values for g in (f, *users_of)]
        vocabs[f.name] = Vocabulary.build(np.concatenate(train_tokens), catalogue.get(f.name))
    stages.update()

    stages.set_postfix_str("writing")
    with atomic_dir(out) as tmp:  # a failure leaves the previous dataset (or nothing), never a partial one
        (tmp / "vocab").mkdir()
        stats: dict = {"rows_read": n_all, "rows_dropped_by_label_rule": int(n_all - len(keep)),
                       "positive_rate": {}, "unknown_values": {}, "skipped_fields": skipped, "regime_rows": {}}
        counts = {}
        train_counts: dict[str, np.ndarray] = {}  # per vocabulary: occurrences of each id in the training rows
        for name, rows in zip(SPLITS, parts, strict=True):
            columns: dict[str, pa.Array] = {"label": pa.array(label[rows].astype(np.float32))}
            unknown = {}
            for f in fields:
                if f.kind is FieldKind.DENSE:
                    columns[f.name] = pa.array(dense[f.name][rows])
                    continue
                if f.kind is FieldKind.TEXT:
                    columns[f.name] = pa.array(texts[f.name][rows].tolist(), pa.string())
                    continue
                vocab = vocabs[f.share_vocab or f.name]
                lists = tokens[f.name].take(rows)
                ids, n_unk = vocab.encode(lists.values)
                if n_unk and name != "train":
                    unknown[f.name] = n_unk
                lists = Lists(lists.offsets, ids)
                if f.kind is not FieldKind.CATEGORICAL:
                    lists = lists.capped(f.max_length, "last" if f.kind is FieldKind.SEQUENCE else "first")
                columns[f.name] = pa.array(ids) if f.kind is FieldKind.CATEGORICAL else lists.to_arrow()
                if name == "train":  # what each embedding row is trained on: the ids as the model sees them
                    owner = f.share_vocab or f.name
                    seen = np.bincount(lists.values, minlength=len(vocab))
                    train_counts[owner] = train_counts.get(owner, 0) + seen
            columns["rating"] = pa.array(rating[rows].astype(np.float32))
            if timestamps is not None:
                columns["timestamp"] = pa.array(timestamps[rows].astype(np.int64))
            for column, values in regimes.items():
                columns[column] = pa.array(values[rows])
            stats["regime_rows"][name] = regime_summary(regimes, rows)
            pq.write_table(pa.table(columns), tmp / f"{name}.parquet", row_group_size=ROW_GROUP_SIZE,
                           compression="zstd")
            counts[name] = len(rows)
            stats["positive_rate"][name] = round(float(label[rows].mean()), 6)
            stats["unknown_values"][name] = unknown
            if unknown:
                log.info("%s split: values outside the vocabulary mapped to the unknown id: %s", name, unknown)
        _check_keys_known(schema, stats["unknown_values"], counts)
        prepared_fields = []
        for f in fields:
            owner = f.share_vocab or f.name
            no_vocab = f.kind in (FieldKind.DENSE, FieldKind.TEXT)
            if not no_vocab and f.share_vocab is None:
                _write_vocab(vocabs[f.name], f, tmp / f"vocab/{f.name}.parquet", train_counts[f.name])
            max_length = (f.max_length or schema.history_length) if f.kind is FieldKind.SEQUENCE else f.max_length
            prepared_fields.append(PreparedField(
                name=f.name, kind=f.kind, entity=f.entity, description=f.description,
                vocab_size=0 if no_vocab else len(vocabs[owner]),
                vocab_file=None if no_vocab else f"vocab/{owner}.parquet", table=owner, max_length=max_length,
                transform=transforms.get(f.name)))
        prepared = PreparedSchema(
            name=schema.name, fingerprint=fp, fields=tuple(prepared_fields), label="label",
            split_method=split_method, counts=counts, stats=stats,
            source={"format": schema.source.format, "files": [p.name for p in raw.files],
                    "has_timestamp": raw.has_timestamp, "split_seed": schema.split.seed,
                    "split_ratios": list(schema.split.ratios), "label_rule": schema.to_dict()["label"],
                    "holdout_fraction": schema.split.holdout_fraction if schema.split.method.startswith("cold") else None,
                    "train_fraction": schema.split.train_fraction, "train_rows_before_subsample": len(full_train),
                    "history_length": schema.history_length if history_span is not None else None},
        )
        (tmp / "schema.json").write_text(prepared.to_json())
    out.chmod(0o755)
    stages.update()
    stages.set_postfix_str("done")
    stages.update()
    stages.close()
    return prepared


def _history_tokens(f: FieldSpec, cols: _Columns, tokens: dict[str, Lists], order: np.ndarray,
                    span: np.ndarray, schema: DatasetSchema) -> Lists:
    """Per-interaction history of one attribute: item ids, ratings or an item-side column (first token)."""
    where = f"{schema.where}: field {f.name!r}"
    attr = f.history
    if attr == "item_id":
        per_row = cols.raw.interactions["item_id"].fillna("").to_numpy(dtype=object)
    elif attr in cols.raw.interactions.columns:
        per_row = cols.raw.interactions[attr].fillna("").to_numpy(dtype=object)
    else:
        source = next((g for g in schema.fields if g.column == attr and g.name in tokens), None)
        if source is None:
            raise DataError(f"{where}: history attribute {attr!r} must be item_id, an interaction column, or "
                            "the column of another (non-sequence) field")
        lists = tokens[source.name]
        lengths = np.diff(lists.offsets)
        per_row = np.full(len(lengths), "", dtype=object)
        per_row[lengths > 0] = lists.values[lists.offsets[:-1][lengths > 0]]
    sorted_tokens = Lists(np.arange(len(order) + 1, dtype=np.int64), per_row[order])
    return sorted_tokens.take_ranges(span[0], span[1])


def _write_vocab(vocab: Vocabulary, f: FieldSpec, path: Path, train_rows: np.ndarray) -> None:
    ids = np.arange(len(vocab), dtype=np.int64)
    values = ["<pad>", "<unk>", *vocab.values]
    columns = {"id": pa.array(ids), "value": pa.array(values, pa.string()),
               "train_rows": pa.array(np.asarray(train_rows, dtype=np.int64))}
    if f.value_text:
        columns["text"] = pa.array([f.value_text.get(v, v) for v in values], pa.string())
    pq.write_table(pa.table(columns), path, compression="zstd")


def _check_replaceable(out: Path) -> None:
    if out.is_dir() and not (out / "schema.json").is_file() and any(out.iterdir()):
        raise DataError(f"{out} exists, is not empty and is not a prepared dataset: refusing to replace it")
