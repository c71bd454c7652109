"""Versioned text templates: a prepared dataset becomes ``(key, text)`` pairs for each entity.

Raw values come from the vocabulary files (their readable ``text`` column where there is one), never from
ids. Key spaces (see ``recsys.features.table``):

- ``field``: one table; key = the field's position in ``schema.json``; text = its name and description.
- ``feature``: one table per field that owns its vocabulary (categorical, multi-categorical, and sequence
  fields such as ``hist_rating`` that are not sharing another field's vocabulary); key = the id in that
  vocabulary; text = "<field> is <value>.", the field named by its one-line description ("The movie's
  genres is Animation."). Fields that share a vocabulary (``hist_item_id`` shares ``item_id``) use the
  owner's table.
- ``item``: key = the ``item_id`` id; text = every item-side field of the item (text fields too: a
  description, a title). Item attributes are
  catalogue data (the same in every row of the item, no label in them), so they are read from all splits:
  items first seen in validation or test still get their title.
- ``user``: key = the ``user_id`` id; text = the profile fields plus the most recent interactions
  (item and rating). The profile (gender, age, occupation, ...) is catalogue data with no label in it, read
  from any split like an item's attributes, so a cold user (no training row) still has one. The behaviour
  part is read from ``train.parquet`` only, so nothing from validation or test leaks into a representation.
  A user in no split gets only its id sentence.

The ``user`` and ``item`` texts are also what ELEC's adaptation (``embedding_jobs.ctr_adapt``) trains on: a
training row is read as its user's text and its item's text, so a table embedded with the adapted model
stores, for each key, ``T(meanpool(H))`` of exactly the text its training saw (``H`` the last hidden states,
``T`` the trained transformation MLP; see ``embedding_jobs.jobs``).

Every id of the key vocabulary (padding and unknown aside) gets a text, so a finished table has no
missing key. Change any template string or rule here and bump :data:`TEMPLATE_VERSION`; the hash of the
strings and options is recorded in every table either way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

import numpy as np
import pyarrow as pa

from embedding_jobs.prepared import SPLITS, PreparedData
from recsys.data.schema import FIRST_ID, Entity, FieldKind, PreparedField
from recsys.data.sources import DataError
from recsys.features.table import FIELD_TABLE, FeatureEntity

TEMPLATE_VERSION = 3  # 2: history_outcomes (user texts without ratings); 3: every user's profile, from any split

FIELD_TEMPLATE = "{name}: {description}."
# The field is named by its description, not its column name: "the movie's genres" tells the model what
# the value belongs to, and measured with MiniLM it separates the values of one field far better than
# "genres is ..." (the values' vectors otherwise share little but the template).
FEATURE_TEMPLATE = "{field} is {value}."
VALUE_SEPARATOR = ", "  # the values of a multi-valued field
SENTENCE_SEPARATOR = " "
# Most recent first: a text longer than the model's limit is cut at the end, which then drops the oldest.
HISTORY_TEMPLATE = "{header}: {items}."
HISTORY_HEADER_TIMED = "Recently rated, most recent first"
HISTORY_HEADER_UNTIMED = "Rated"  # no timestamps: the training file's order, which is not time
HISTORY_HEADER_TIMED_PLAIN = "Recently watched, most recent first"  # history_outcomes off: items only
HISTORY_HEADER_UNTIMED_PLAIN = "Watched"
HISTORY_ITEM_RATED = "{item} (rated {rating})"
HISTORY_ITEM_CLICKED = "{item} ({outcome})"  # when the dataset has no rating column
CLICK_OUTCOMES = ("not clicked", "clicked")
HISTORY_SEPARATOR = "; "

TEMPLATES = {
    "field": FIELD_TEMPLATE, "feature": FEATURE_TEMPLATE, "value_separator": VALUE_SEPARATOR,
    "sentence_separator": SENTENCE_SEPARATOR, "history": HISTORY_TEMPLATE, "history_timed": HISTORY_HEADER_TIMED,
    "history_untimed": HISTORY_HEADER_UNTIMED, "history_timed_plain": HISTORY_HEADER_TIMED_PLAIN,
    "history_untimed_plain": HISTORY_HEADER_UNTIMED_PLAIN, "history_rated": HISTORY_ITEM_RATED,
    "history_clicked": HISTORY_ITEM_CLICKED, "click_outcomes": list(CLICK_OUTCOMES),
    "history_separator": HISTORY_SEPARATOR,
}


@dataclass(frozen=True)
class TemplateOptions:
    # interactions in a user's text; 0: the profile only (a user's text then depends on no training row)
    history_length: int = 20
    user_key_field: str = "user_id"
    item_key_field: str = "item_id"
    # How an interacted item is named in a user's text. None: the field ``title`` where the dataset has
    # one, else the item key field.
    history_item_field: str | None = None
    # Whether the history names each interaction's outcome (rating or click). A model trained on labels
    # with such user texts sees the training rows' own labels in them (a user's text is built from training
    # rows, and precomputed once per user): ELEC's adaptation turns this off.
    history_outcomes: bool = True

    def resolve(self, data: PreparedData) -> TemplateOptions:
        """The options with the default history field filled in, so the template hash records it."""
        if self.history_length < 0:
            raise ValueError(f"history_length must be >= 0 (0: the profile only), got {self.history_length}")
        if self.history_item_field is not None:
            return self
        names = [f.name for f in data.schema.fields]
        return replace(self, history_item_field="title" if "title" in names else self.item_key_field)


@dataclass(frozen=True)
class TextTable:
    """The texts of one feature table, keys ascending."""

    entity: FeatureEntity
    table: str  # "field" or the vocabulary the keys index
    num_rows: int  # size of the key space
    keys: np.ndarray  # int64
    texts: list[str]


def template_hash(entity: FeatureEntity, options: TemplateOptions) -> str:
    """sha256 of the version, every template string, and the options that shape this entity's texts."""
    spec = {"version": TEMPLATE_VERSION, "templates": TEMPLATES, "options": relevant_options(entity, options)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def relevant_options(entity: FeatureEntity, options: TemplateOptions) -> dict[str, object]:
    """Only the options that change this entity's texts (a field table does not depend on history length)."""
    if entity is FeatureEntity.USER:
        return asdict(options)
    if entity is FeatureEntity.ITEM:
        return {"item_key_field": options.item_key_field}
    return {}


def build_texts(data: PreparedData, entity: FeatureEntity, options: TemplateOptions) -> list[TextTable]:
    """The text tables of ``entity``: one for field, user and item; one per owned vocabulary for feature."""
    options = options.resolve(data)
    if entity is FeatureEntity.FIELD:
        return [field_texts(data)]
    if entity is FeatureEntity.FEATURE:
        return feature_texts(data)
    if entity is FeatureEntity.ITEM:
        return [item_texts(data, options)]
    return [user_texts(data, options)]


def display_name(name: str) -> str:
    """A field name as words: ``hist_item_id`` -> ``hist item id``."""
    return name.replace("_", " ")


def subject(f: PreparedField) -> str:
    """How a feature sentence names its field: the description, else the name as words."""
    return f.description.strip().rstrip(".") or display_name(f.name)


def feature_sentence(f: PreparedField, value: str) -> str:
    text = FEATURE_TEMPLATE.format(field=subject(f), value=value)
    return text[:1].upper() + text[1:]


def field_texts(data: PreparedData) -> TextTable:
    fields = data.schema.fields
    texts = [FIELD_TEMPLATE.format(name=display_name(f.name), description=f.description.strip().rstrip("."))
             for f in fields]
    return TextTable(FeatureEntity.FIELD, FIELD_TABLE, len(fields), np.arange(len(fields), dtype=np.int64), texts)


def feature_texts(data: PreparedData) -> list[TextTable]:
    tables = []
    for f in data.schema.fields:
        if f.vocab_file is None or f.table != f.name:
            continue  # dense, or it shares another field's vocabulary
        values = data.vocab_text(f)
        keys = np.arange(FIRST_ID, f.vocab_size, dtype=np.int64)
        texts = [feature_sentence(f, values[k]) for k in keys]
        tables.append(TextTable(FeatureEntity.FEATURE, f.name, f.vocab_size, keys, texts))
    return tables


def item_texts(data: PreparedData, options: TemplateOptions) -> TextTable:
    key = _key_field(data, options.item_key_field, Entity.ITEM)
    side = _side_fields(data, Entity.ITEM)
    rows = pa.concat_tables([data.read_split(s, [f.name for f in side]) for s in SPLITS])
    first_rows = _first_row_per_key(rows, key.name)
    keys = np.arange(FIRST_ID, key.vocab_size, dtype=np.int64)
    texts = []
    for k in keys:
        row = first_rows.get(int(k))
        sentences = (_sentences(data, side, row) if row is not None else
                     [feature_sentence(key, data.vocab_text(key)[k])])
        texts.append(SENTENCE_SEPARATOR.join(sentences))
    return TextTable(FeatureEntity.ITEM, key.table, key.vocab_size, keys, texts)


def user_texts(data: PreparedData, options: TemplateOptions) -> TextTable:
    """Profile plus the ``history_length`` most recent training interactions of every user."""
    key = _key_field(data, options.user_key_field, Entity.USER)
    profile = _side_fields(data, Entity.USER)
    assert options.history_item_field is not None, "call options.resolve() first"
    item_field = data.field(options.history_item_field)
    if item_field.entity is not Entity.ITEM or item_field.kind not in (FieldKind.CATEGORICAL,
                                                                       FieldKind.MULTI_CATEGORICAL):
        raise DataError(f"{data.folder}: history item field {item_field.name!r} must be an item-side categorical "
                        f"field, it is a {item_field.entity} {item_field.kind} field")
    timed = data.has_column("train", "timestamp")
    outcome = "rating" if data.has_column("train", "rating") else data.schema.label
    columns = list(dict.fromkeys([key.name, item_field.name, outcome] + (["timestamp"] if timed else [])))
    train = data.read_split("train", columns)  # ONLY the training split: nothing else may leak in
    # the profile is catalogue data (no label in it): a user's first row in any split has it
    profiles = _first_row_per_key(pa.concat_tables([data.read_split(s, list(dict.fromkeys(
        [key.name, *(f.name for f in profile)]))) for s in SPLITS]), key.name)
    users = train.column(key.name).to_numpy()
    row_no = np.arange(len(users))
    order = (np.lexsort((row_no, train.column("timestamp").to_numpy(), users)) if timed
             else np.lexsort((row_no, users)))
    sorted_users = users[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]]) if len(users) else np.array([], int)
    ends = np.r_[starts[1:], len(users)]
    outcomes = train.column(outcome).to_numpy()
    item_values = train.column(item_field.name)
    header = ((HISTORY_HEADER_TIMED if timed else HISTORY_HEADER_UNTIMED) if options.history_outcomes else
              (HISTORY_HEADER_TIMED_PLAIN if timed else HISTORY_HEADER_UNTIMED_PLAIN))

    history: dict[int, list[str]] = {}
    for start, end in zip(starts, ends, strict=True):
        rows = order[start:end]
        recent = rows[len(rows) - options.history_length:]
        recent = recent[::-1] if timed else recent
        items = []
        for r in recent:
            name = _format_value(data, item_field, item_values[int(r)].as_py())
            if name is None:
                continue  # the unknown item: nothing to say about it
            if not options.history_outcomes:
                items.append(name)
            elif outcome == "rating":
                items.append(HISTORY_ITEM_RATED.format(item=name, rating=f"{float(outcomes[r]):g}"))
            else:
                items.append(HISTORY_ITEM_CLICKED.format(item=name, outcome=CLICK_OUTCOMES[int(outcomes[r] > 0.5)]))
        if items:
            history[int(sorted_users[start])] = [HISTORY_TEMPLATE.format(header=header,
                                                                         items=HISTORY_SEPARATOR.join(items))]

    keys = np.arange(FIRST_ID, key.vocab_size, dtype=np.int64)
    id_text = data.vocab_text(key)
    texts = []
    for k in keys:
        row = profiles.get(int(k))
        sentences = _sentences(data, profile, row) if row is not None else []
        sentences += history.get(int(k), [])
        texts.append(SENTENCE_SEPARATOR.join(sentences) or feature_sentence(key, id_text[k]))
    return TextTable(FeatureEntity.USER, key.table, key.vocab_size, keys, texts)


def _key_field(data: PreparedData, name: str, entity: Entity) -> PreparedField:
    f = data.field(name)
    if f.kind is not FieldKind.CATEGORICAL or f.entity is not entity or f.table != f.name:
        raise DataError(f"{data.folder}: key field {name!r} must be a categorical {entity} field with its own "
                        f"vocabulary; it is a {f.entity} {f.kind} field (table {f.table!r})")
    return f


def _side_fields(data: PreparedData, entity: Entity) -> list[PreparedField]:
    """The fields that describe the entity itself, in schema order (histories are not attributes)."""
    return [f for f in data.schema.fields if f.entity is entity and f.kind is not FieldKind.SEQUENCE]


def _first_row_per_key(rows: pa.Table, key: str) -> dict[int, dict[str, object]]:
    keys = rows.column(key).to_numpy()
    uniq, first = np.unique(keys, return_index=True)
    taken = rows.take(pa.array(first)).to_pylist()
    return {int(k): row for k, row in zip(uniq, taken, strict=True)}


def _sentences(data: PreparedData, fields: list[PreparedField], row: dict[str, object]) -> list[str]:
    out = []
    for f in fields:
        value = _format_value(data, f, row[f.name])
        if value is not None:
            out.append(feature_sentence(f, value))
    return out


def _format_value(data: PreparedData, f: PreparedField, value: object) -> str | None:
    """The readable value of one cell, or None when it says nothing (padding, unknown, no values)."""
    if f.kind is FieldKind.DENSE:
        return None if value is None else f"{float(value):g}"
    if f.kind is FieldKind.TEXT:  # free text, as the source wrote it
        return str(value).strip() or None if value is not None else None
    vocab = data.vocab_text(f)
    ids = value if isinstance(value, list) else [value]
    words = [vocab[i] for i in ids if i is not None and i >= FIRST_ID]
    return VALUE_SEPARATOR.join(words) if words else None
