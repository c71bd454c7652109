"""Shared fixtures: a tiny generic-table (``format: table``) dataset written into a temporary folder."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY_USERS = pd.DataFrame({
    # u6 is in the catalogue only: it never rates anything
    "user_id": ["u1", "u2", "u3", "u4", "u5", "u6"],
    "gender": ["M", "F", "M", "F", "M", "F"],
    "age": ["21", "34", "45", "19", "60", "27"],
})
TINY_ITEMS = pd.DataFrame({
    # i3 has four genres (capped to two), i4 none, i9 and its genre 'Western' are in the catalogue only
    "item_id": ["i1", "i2", "i3", "i4", "i5", "i6", "i7", "i8", "i9"],
    "title": ["Alpha", "Beta", "Gamma", "Delta", "Epsilon", "Zeta", "Eta", "Theta", "Iota"],
    "genres": ["Action|Comedy", "Drama", "Action|Drama|Horror|Sci-Fi", "", "Comedy", "Romance|Drama", "Horror",
               "Comedy|Romance", "Western"],
})
TINY_HISTORY_LENGTH = 4
TINY_GENRES_MAX = 2
UNSEEN_DEVICE = "tv"  # only in the three newest interactions, so never in the training split

TINY_FIELDS = [
    {"name": "user_id", "kind": "categorical", "entity": "user", "column": "user_id", "description": "user"},
    {"name": "gender", "kind": "categorical", "entity": "user", "column": "gender", "description": "gender",
     "value_text": {"M": "male", "F": "female"}},
    {"name": "age", "kind": "dense", "entity": "user", "column": "age", "description": "age in years"},
    {"name": "item_id", "kind": "categorical", "entity": "item", "column": "item_id", "description": "item"},
    {"name": "genres", "kind": "multi_categorical", "entity": "item", "column": "genres", "separator": "|",
     "max_length": TINY_GENRES_MAX, "description": "genres"},
    {"name": "device", "kind": "categorical", "entity": "context", "column": "device", "description": "device"},
    {"name": "row_no", "kind": "dense", "entity": "context", "column": "row_no",
     "description": "the raw row's number (lets tests find each prepared row's raw row)"},
    {"name": "hist_item_id", "kind": "sequence", "entity": "user", "history": "item_id", "share_vocab": "item_id",
     "description": "earlier items"},
    {"name": "hist_rating", "kind": "sequence", "entity": "user", "history": "rating",
     "description": "earlier ratings"},
    {"name": "hist_genre", "kind": "sequence", "entity": "user", "history": "genres", "share_vocab": "genres",
     "description": "first genre of earlier items"},
]

TINY_SCHEMA = {
    "name": "tiny",
    "description": "a tiny generic-table dataset for tests",
    "source": {
        "format": "table",
        "root": "raw",
        "interactions": {"path": "interactions.csv"},
        "users": {"path": "users.csv"},
        "items": {"path": "items.csv"},
    },
    "label": {"column": "rating", "positive_above": 3, "negative_below": 3, "min_value": 1, "max_value": 5},
    "split": {"method": "auto", "ratios": [0.8, 0.1, 0.1], "seed": 7},
    "history_length": TINY_HISTORY_LENGTH,
    "fields": TINY_FIELDS,
}


def tiny_interactions(n: int = 60, seed: int = 0) -> pd.DataFrame:
    """``n`` random interactions of five users with many timestamp ties, plus three newest ones on an unseen
    device. All values are strings, as the raw file spells them; ``row_no`` is the row's 0-based number."""
    rng = np.random.default_rng(seed)
    users = TINY_USERS["user_id"].tolist()[:5]
    items = TINY_ITEMS["item_id"].tolist()[:8]
    rows = []
    for r in range(n):
        rows.append({
            "user_id": str(rng.choice(users)), "item_id": str(rng.choice(items)),
            "rating": str(int(rng.integers(1, 6))), "timestamp": str(1000 + int(rng.integers(0, 8))),
            "device": ("web", "app")[r % 2],
        })
    for k, (u, i, rating) in enumerate([("u1", "i2", "5"), ("u2", "i3", "1"), ("u3", "i1", "4")]):
        rows.append({"user_id": u, "item_id": i, "rating": rating, "timestamp": str(2000 + k),
                     "device": UNSEEN_DEVICE})
    df = pd.DataFrame(rows)
    df["row_no"] = [str(i) for i in range(len(df))]
    return df


def write_csv(df: pd.DataFrame, path: Path) -> None:
    lines = [",".join(df.columns)] + [",".join(map(str, row)) for row in df.itertuples(index=False)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@dataclass
class TinyDataset:
    folder: Path  # holds schema.yaml and raw/
    schema: dict
    interactions: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame

    @property
    def schema_path(self) -> Path:
        return self.folder / "schema.yaml"

    @property
    def raw(self) -> Path:
        return self.folder / "raw"

    def write(self) -> TinyDataset:
        self.raw.mkdir(parents=True, exist_ok=True)
        write_csv(self.interactions, self.raw / "interactions.csv")
        write_csv(self.users, self.raw / "users.csv")
        write_csv(self.items, self.raw / "items.csv")
        self.write_schema()
        return self

    def write_schema(self, schema: dict | None = None) -> None:
        if schema is not None:
            self.schema = schema
        self.schema_path.write_text(yaml.safe_dump(self.schema, sort_keys=False), encoding="utf-8")

    def lines(self, name: str) -> list[str]:
        return (self.raw / name).read_text(encoding="utf-8").splitlines()

    def write_lines(self, name: str, lines: list[str]) -> None:
        (self.raw / name).write_text("\n".join(lines) + "\n", encoding="utf-8")

    def set_line(self, name: str, line: int, text: str) -> None:
        """Replace 1-based ``line`` of a raw file."""
        lines = self.lines(name)
        lines[line - 1] = text
        self.write_lines(name, lines)

    def insert_line(self, name: str, line: int, text: str) -> None:
        """Insert ``text`` so that it becomes 1-based ``line`` of a raw file."""
        lines = self.lines(name)
        lines.insert(line - 1, text)
        self.write_lines(name, lines)


def make_tiny(folder: Path, n: int = 60, seed: int = 0) -> TinyDataset:
    return TinyDataset(folder, copy.deepcopy(TINY_SCHEMA), tiny_interactions(n, seed), TINY_USERS.copy(),
                       TINY_ITEMS.copy()).write()


@pytest.fixture
def tiny(tmp_path: Path) -> TinyDataset:
    """A fresh tiny dataset that a test may change."""
    return make_tiny(tmp_path / "tiny")


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory: pytest.TempPathFactory):
    """The tiny dataset prepared once (read-only), with row groups of 8 rows so that loaders cross them."""
    from recsys.data import prepare as prepare_module
    from recsys.data.schema import load_schema

    ds = make_tiny(tmp_path_factory.mktemp("tiny-prepared") / "tiny")
    out = ds.folder.parent / "prepared"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prepare_module, "ROW_GROUP_SIZE", 8)
        prepared = prepare_module.prepare(load_schema(ds.schema_path), out, progress=False)
    return ds, out, prepared
