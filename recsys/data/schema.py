"""Dataset schema files: what a raw dataset looks like and how it becomes model input.

A schema (YAML or JSON) names its source files, the label rule, the split rule, and every field with its
kind, the entity it describes and a one-line description. ``recsys.prepare`` turns it into a prepared
dataset whose ``schema.json`` (:class:`PreparedSchema`) is what trainers and language-model jobs read.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from enum import Enum, StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

PAD_ID = 0  # padding in jagged/sequence inputs and in padded batches
UNK_ID = 1  # a value never seen while building the vocabulary
FIRST_ID = 2

BUILTIN_SCHEMAS = ("ml-100k", "ml-1m")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SchemaError(ValueError):
    """A schema file that cannot be used; the message names the file and the entry."""


class FieldKind(StrEnum):
    CATEGORICAL = "categorical"
    MULTI_CATEGORICAL = "multi_categorical"
    SEQUENCE = "sequence"
    DENSE = "dense"
    TEXT = "text"  # an entity's free text (a title, a review, a description): for the language-model side only


class Normalize(StrEnum):
    """How a dense field's raw values are turned into model inputs (fitted on the training rows)."""

    NONE = "none"
    LOG1P = "log1p"  # log(1 + x), for counts and other heavy-tailed non-negative values
    STANDARD = "standard"  # (x - mean) / std of the training rows
    LOG1P_STANDARD = "log1p_standard"  # both, in that order


class Entity(StrEnum):
    USER = "user"
    ITEM = "item"
    CONTEXT = "context"


@dataclass(frozen=True)
class FieldSpec:
    """One model input.

    ``column`` is a column of the joined raw table (interactions + user and item side tables). Sequence
    fields instead take ``history`` (which per-position attribute of the user's earlier interactions:
    ``item_id``, ``rating``, or any item-side column) and share the vocabulary of ``share_vocab``.
    """

    name: str
    kind: FieldKind
    entity: Entity
    description: str
    column: str | None = None
    separator: str | None = None  # multi-valued raw strings, e.g. "Comedy|Drama"
    max_length: int | None = None  # multi-valued and sequence fields are capped to this many values
    history: str | None = None
    share_vocab: str | None = None  # use another field's vocabulary (and embedding table)
    value_text: dict[str, str] | None = None  # codes to readable text, for the language-model side
    normalize: Normalize = Normalize.NONE  # dense fields: none, log1p, standard (fitted on train), log1p_standard


@dataclass(frozen=True)
class LabelRule:
    column: str = "rating"
    positive_above: float = 3.0  # value > positive_above is a click
    negative_below: float = 3.0  # value < negative_below is a non-click; anything between is dropped
    min_value: float | None = None  # values outside [min_value, max_value] are bad input, not dropped
    max_value: float | None = None
    binary: bool = False  # the column holds 0/1 itself (a click log): 1 is a click, 0 is not, anything else is bad


SPLIT_METHODS = ("auto", "time", "random", "cold_item", "cold_user")


@dataclass(frozen=True)
class SplitRule:
    # auto: time if the source has timestamps, else random. cold_item / cold_user: a seeded fraction
    # (holdout_fraction) of the items / users is held out entirely, their rows split half and half into valid
    # and test; every other row is split as auto would split it.
    method: str = "auto"
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 2024
    holdout_fraction: float = 0.1
    # A seeded subsample of the training rows (the sparse-data regime); valid and test keep their rows, and
    # ids are the same as with the whole training split (the vocabulary is built from all of it).
    train_fraction: float = 1.0


@dataclass(frozen=True)
class TableSource:
    """One raw table of a generic (``format: table``) source."""

    path: str
    key: str | None = None  # join key of a side table (user_id or item_id column name)
    sep: str = ","
    encoding: str = "utf-8"
    has_header: bool = True
    column_names: tuple[str, ...] | None = None  # when has_header is false
    quote: str | None = '"'  # a field that starts with it is quoted (separators and newlines inside); null: none


@dataclass(frozen=True)
class SourceSpec:
    format: str  # movielens-100k, movielens-1m, table
    root: str | None = None
    interactions: TableSource | None = None
    users: TableSource | None = None
    items: TableSource | None = None
    user_column: str | None = "user_id"  # null: the interactions have no user ids (no user entity, no histories)
    item_column: str = "item_id"
    # None (not given): the column "timestamp" if the interactions have one; a name: that column, which must
    # exist; "": no timestamps (a random split, no histories)
    timestamp_column: str | None = None


@dataclass(frozen=True)
class DatasetSchema:
    name: str
    description: str
    source: SourceSpec
    fields: tuple[FieldSpec, ...]
    label: LabelRule = LabelRule()
    split: SplitRule = SplitRule()
    history_length: int = 20
    path: Path | None = None  # the file it was read from; relative source paths resolve against it

    def field(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise SchemaError(f"{self.where}: no field named {name!r}; fields are {[f.name for f in self.fields]}")

    @property
    def where(self) -> str:
        return str(self.path) if self.path else f"schema {self.name!r}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("path")
        return json.loads(json.dumps(d, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, Enum):
        return o.value
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise SchemaError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SchemaError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known - {'path'})}")
    try:
        return cls(**data)
    except TypeError as e:
        raise SchemaError(f"{where}: {e}") from None


def _parse(data: dict[str, Any], path: Path | None) -> DatasetSchema:
    where = str(path) if path else "schema"
    data = dict(data)
    src = dict(data.pop("source", None) or {})
    for part in ("interactions", "users", "items"):
        if src.get(part) is not None:
            t = dict(src[part])
            if t.get("column_names") is not None:
                t["column_names"] = tuple(t["column_names"])
            src[part] = _build(TableSource, t, f"{where}: source.{part}")
    source = _build(SourceSpec, src, f"{where}: source")
    raw_fields = data.pop("fields", None)
    if not raw_fields:
        raise SchemaError(f"{where}: 'fields' is missing or empty")
    parsed = []
    for i, f in enumerate(raw_fields):
        f = dict(f)
        fw = f"{where}: fields[{i}] ({f.get('name', '?')})"
        try:
            f["kind"] = FieldKind(f.get("kind"))
            f["entity"] = Entity(f.get("entity"))
            if "normalize" in f:
                f["normalize"] = Normalize(f["normalize"])
        except ValueError as e:
            raise SchemaError(f"{fw}: {e}; kinds: {[k.value for k in FieldKind]}, "
                              f"entities: {[k.value for k in Entity]}, normalize: {[k.value for k in Normalize]}") from None
        if f.get("value_text") is not None:
            f["value_text"] = {str(k): str(v) for k, v in f["value_text"].items()}
        parsed.append(_build(FieldSpec, f, fw))
    label = _build(LabelRule, data.pop("label", None) or {}, f"{where}: label")
    split = dict(data.pop("split", None) or {})
    if "ratios" in split:
        split["ratios"] = tuple(float(r) for r in split["ratios"])
    split = _build(SplitRule, split, f"{where}: split")
    schema = _build(DatasetSchema, {**data, "source": source, "fields": tuple(parsed), "label": label,
                                    "split": split, "path": path}, where)
    validate(schema)
    return schema


def validate(schema: DatasetSchema) -> None:
    w = schema.where
    if not _NAME_RE.match(schema.name.replace("-", "_")):
        raise SchemaError(f"{w}: dataset name {schema.name!r} must be letters, digits, '-' or '_'")
    names = [f.name for f in schema.fields]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SchemaError(f"{w}: duplicate field names {dupes}")
    by_name = {f.name: f for f in schema.fields}
    for f in schema.fields:
        fw = f"{w}: field {f.name!r}"
        # Field names become file names (vocab/<name>.parquet): keep them plain so no path can escape.
        if not _NAME_RE.match(f.name):
            raise SchemaError(f"{fw}: a field name must match {_NAME_RE.pattern}")
        if f.kind is FieldKind.SEQUENCE:
            if not f.history:
                raise SchemaError(f"{fw}: a sequence field needs 'history' (item_id, rating or an item column)")
            if f.column:
                raise SchemaError(f"{fw}: a sequence field takes 'history', not 'column'")
        elif not f.column:
            raise SchemaError(f"{fw}: 'column' is missing")
        if f.kind is FieldKind.MULTI_CATEGORICAL and not f.separator:
            raise SchemaError(f"{fw}: a multi_categorical field needs 'separator'")
        if f.share_vocab is not None:
            owner = by_name.get(f.share_vocab)
            if owner is None:
                raise SchemaError(f"{fw}: share_vocab names unknown field {f.share_vocab!r}; fields are {names}")
            if owner.share_vocab is not None:
                raise SchemaError(f"{fw}: share_vocab must name a field that owns its vocabulary, "
                                  f"but {owner.name!r} shares {owner.share_vocab!r}")
            if owner.kind is FieldKind.DENSE or f.kind is FieldKind.DENSE:
                raise SchemaError(f"{fw}: dense fields have no vocabulary to share")
        if f.max_length is not None and f.max_length < 1:
            raise SchemaError(f"{fw}: max_length must be >= 1")
        if f.normalize is not Normalize.NONE and f.kind is not FieldKind.DENSE:
            raise SchemaError(f"{fw}: normalize applies to dense fields only")
        if f.kind is FieldKind.TEXT and (f.share_vocab or f.separator or f.value_text):
            raise SchemaError(f"{fw}: a text field is stored as it is: no share_vocab, separator or value_text")
    r = schema.split.ratios
    if len(r) != 3 or any(x <= 0 for x in r) or abs(sum(r) - 1.0) > 1e-6:
        raise SchemaError(f"{w}: split.ratios must be three positive numbers that sum to 1, got {list(r)}")
    if schema.split.method not in SPLIT_METHODS:
        raise SchemaError(f"{w}: split.method must be one of {list(SPLIT_METHODS)}, got {schema.split.method!r}")
    if not 0 < schema.split.holdout_fraction < 1:
        raise SchemaError(f"{w}: split.holdout_fraction must be between 0 and 1, got {schema.split.holdout_fraction}")
    if not 0 < schema.split.train_fraction <= 1:
        raise SchemaError(f"{w}: split.train_fraction must be in (0, 1], got {schema.split.train_fraction}")
    users = bool(schema.source.user_column) or schema.source.format != "table"
    if not users:
        seq = [f.name for f in schema.fields if f.kind is FieldKind.SEQUENCE]
        if seq:
            raise SchemaError(f"{w}: sequence fields {seq} are users' histories, and source.user_column is null "
                              "(no user ids): remove them")
        if schema.split.method == "cold_user":
            raise SchemaError(f"{w}: split.method cold_user needs user ids, and source.user_column is null")
        if schema.source.users is not None:
            raise SchemaError(f"{w}: source.users is given but source.user_column is null")
    if schema.label.negative_below > schema.label.positive_above:
        raise SchemaError(f"{w}: label.negative_below must be <= label.positive_above")
    if schema.source.format not in ("movielens-100k", "movielens-1m", "table"):
        raise SchemaError(f"{w}: source.format must be movielens-100k, movielens-1m or table, "
                          f"got {schema.source.format!r}")
    if schema.history_length < 1:
        raise SchemaError(f"{w}: history_length must be >= 1")


def load_schema(name_or_path: str | Path) -> DatasetSchema:
    """Load a built-in schema by name (``ml-100k``, ``ml-1m``) or a YAML/JSON schema file."""
    if str(name_or_path) in BUILTIN_SCHEMAS:
        res = resources.files("recsys.data") / "schemas" / f"{name_or_path}.yaml"
        return _parse(yaml.safe_load(res.read_text()), None)
    path = Path(name_or_path)
    if not path.is_file():
        raise SchemaError(f"schema file {path} does not exist (built-in schemas: {', '.join(BUILTIN_SCHEMAS)})")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise SchemaError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    return _parse(data, path.resolve())


def resolve_inside(base: Path, relative: str, what: str) -> Path:
    """``base / relative``, refusing paths that leave ``base`` (absolute paths, ``..``, symlinks out)."""
    base = base.resolve()
    target = (base / relative).resolve()
    if not target.is_relative_to(base):
        raise SchemaError(f"{what}: path {relative!r} leaves the folder {base}; schema paths must stay inside it")
    return target


# --------------------------------------------------------------------------------------------------
# The prepared dataset's schema.json (DESIGN.md contract 1)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedField:
    name: str
    kind: FieldKind
    entity: Entity
    description: str
    vocab_size: int  # ids are 0..vocab_size-1, 0 = padding, 1 = unknown; 0 for dense and text fields
    vocab_file: str | None  # relative to the prepared folder; id -> raw value (and readable text)
    table: str  # the embedding table: the field itself or the field it shares a vocabulary with
    max_length: int | None = None
    # dense fields: how raw values became inputs, with what was fitted on train ({"kind": "standard",
    # "mean": ..., "std": ...}); apply the same to raw values served later
    transform: dict[str, Any] | None = None


# Columns of every prepared split that are never model inputs: they say which regime a row is in.
USER_TRAIN_ROWS = "user_train_rows"  # training rows of the row's user (0: a cold user)
ITEM_TRAIN_ROWS = "item_train_rows"  # training rows of the row's item (0: a cold item; 1-5: the long tail)
USER_KEY = "user_key"  # the raw user, as a number (users unknown to the vocabulary stay apart: GAUC groups by it)
REGIME_COLUMNS = (USER_TRAIN_ROWS, ITEM_TRAIN_ROWS, USER_KEY)


@dataclass(frozen=True)
class PreparedSchema:
    name: str
    fingerprint: str
    fields: tuple[PreparedField, ...]
    label: str
    split_method: str
    counts: dict[str, int]
    stats: dict[str, Any]
    source: dict[str, Any]
    format_version: int = 2  # 2: regime columns in the splits, train_rows in the vocabularies

    @property
    def sparse_fields(self) -> tuple[PreparedField, ...]:
        return tuple(f for f in self.fields if f.kind not in (FieldKind.DENSE, FieldKind.TEXT))

    @property
    def text_fields(self) -> tuple[PreparedField, ...]:
        return tuple(f for f in self.fields if f.kind is FieldKind.TEXT)

    @property
    def dense_fields(self) -> tuple[PreparedField, ...]:
        return tuple(f for f in self.fields if f.kind is FieldKind.DENSE)

    def field(self, name: str) -> PreparedField:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"prepared dataset {self.name!r} has no field {name!r}; "
                       f"fields are {[f.name for f in self.fields]}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=_json_default, indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, folder: str | Path) -> PreparedSchema:
        path = Path(folder) / "schema.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {folder} a prepared dataset? "
                                    "Make one with `python -m recsys.prepare`.")
        d = json.loads(path.read_text())
        fs = tuple(PreparedField(**{**f, "kind": FieldKind(f["kind"]), "entity": Entity(f["entity"])})
                   for f in d.pop("fields"))
        for f in fs:  # names become file and folder names (vocabularies, feature tables): no path may escape
            if not (_NAME_RE.match(f.name) and _NAME_RE.match(f.table)):
                raise SchemaError(f"{path}: field {f.name!r} (table {f.table!r}): a name must match "
                                  f"{_NAME_RE.pattern}")
            if f.vocab_file not in (None, f"vocab/{f.table}.parquet"):
                raise SchemaError(f"{path}: field {f.name!r} names the vocabulary file {f.vocab_file!r}; a prepared "
                                  f"dataset keeps it at vocab/{f.table}.parquet")
        return cls(fields=fs, **d)


def field_names(schema: DatasetSchema | PreparedSchema) -> list[str]:
    return [f.name for f in schema.fields]


__all__ = [
    "PAD_ID", "UNK_ID", "FIRST_ID", "SchemaError", "Normalize", "SPLIT_METHODS", "REGIME_COLUMNS", "USER_TRAIN_ROWS",
    "ITEM_TRAIN_ROWS", "USER_KEY", "FieldKind", "Entity", "FieldSpec", "LabelRule", "SplitRule",
    "TableSource", "SourceSpec", "DatasetSchema", "PreparedField", "PreparedSchema", "load_schema",
    "resolve_inside", "field_names",
]
