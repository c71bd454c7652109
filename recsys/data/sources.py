"""Readers for raw datasets: each returns the same three tables with canonical column names.

``interactions`` has ``user_id``, ``item_id``, the label column and, where the source has one, ``timestamp``;
``users`` is keyed by ``user_id`` and ``items`` by ``item_id``. Every value is read as text first, so a
token id keeps its raw spelling (the vocabulary maps ids back to it) and a bad value is reported with its
file, line and column instead of silently becoming NaN.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass, field
from importlib import util as importlib_util
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from recsys.data.schema import DatasetSchema, SchemaError, TableSource, resolve_inside

log = logging.getLogger(__name__)

_SEP = "\x1f"  # stands in for multi-character separators such as MovieLens' '::'


class DataError(ValueError):
    """Bad input data; the message names the file and, where known, the line and column."""


@dataclass
class RawTables:
    interactions: pd.DataFrame
    users: pd.DataFrame | None
    items: pd.DataFrame | None
    has_timestamp: bool
    files: list[Path] = field(default_factory=list)  # every file read, for the dataset fingerprint
    # line number in its file of each interaction row, for error messages
    line_of_row: np.ndarray | None = None
    interactions_file: Path | None = None
    # the source's own name of each renamed column (user_id, item_id, timestamp), for error messages
    source_names: dict[str, str] = field(default_factory=dict)

    @property
    def has_users(self) -> bool:
        return "user_id" in self.interactions.columns

    def column_name(self, column: str) -> str:
        """How the source file spells a column that was renamed to a canonical name."""
        return self.source_names.get(column, column)


def read_delimited(path: Path, sep: str, names: list[str] | None, encoding: str = "utf-8",
                   quote: str | None = None) -> pd.DataFrame:
    """Read a delimited text file into a DataFrame of strings.

    ``names`` given: the file has no header and must have exactly these columns. Otherwise the first line is
    the header. ``quote``: a field that starts with it is quoted (it may hold the separator, newlines and a
    doubled quote), as ordinary CSV exports write; None reads quotes as text (MovieLens' own files). A UTF-8
    byte-order mark is dropped. A row with the wrong number of columns or bytes that are not valid
    ``encoding`` raise a DataError naming the file and line.
    """
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    raw = path.read_bytes()
    if encoding.lower().replace("_", "-") in ("utf-8", "utf8"):
        encoding = "utf-8-sig"  # a byte-order mark would otherwise become part of the first column's name
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}, line {line}: bytes that are not valid {encoding} ({e.reason}); "
                        f"set the table's 'encoding' in the schema (MovieLens files are latin-1)") from None
    given_sep = sep
    if len(sep) > 1:
        text = text.replace(sep, _SEP)
        sep = _SEP
    header_lines = 0 if names else 1

    bad: list[pacsv.InvalidRow] = []

    def bad_row(row: pacsv.InvalidRow) -> str:
        bad.append(row)  # an exception raised here would be swallowed by pyarrow: report after reading
        return "skip"

    if quote is not None and len(given_sep) > 1:
        raise SchemaError(f"{path}: quoting needs a one-character separator, not {given_sep!r}")
    read = pacsv.ReadOptions(column_names=names, autogenerate_column_names=False, use_threads=False)
    parse = pacsv.ParseOptions(delimiter=sep, quote_char=quote or False, double_quote=True,
                               newlines_in_values=quote is not None, invalid_row_handler=bad_row)
    if names is None:  # the header, parsed as the data will be (quoted column names too)
        header = next(csv.reader(io.StringIO(text), delimiter=sep, quotechar=quote or "\0",
                                 quoting=csv.QUOTE_MINIMAL if quote else csv.QUOTE_NONE), [])
        columns = header
    else:
        columns = names
    convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in columns}, strings_can_be_null=False)
    try:
        table = pacsv.read_csv(io.BytesIO(text.encode()), read_options=read, parse_options=parse,
                               convert_options=convert)
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: cannot parse: {e}") from None
    if bad:
        row = bad[0]
        raise DataError(f"{path}, line {row.number}: malformed row, expected {row.expected_columns} columns "
                        f"separated by {given_sep!r}, found {row.actual_columns}: "
                        f"{row.text.replace(_SEP, given_sep)[:200]!r} ({len(bad)} malformed rows)")
    if table.num_rows == 0:
        raise DataError(f"{path}: no data rows")
    df = table.to_pandas()
    df.attrs["path"], df.attrs["header_lines"] = str(path), header_lines
    df.attrs["format"] = {"sep": sep, "quote": quote, "encoding": encoding}
    return df


def line_of(df: pd.DataFrame, row: int) -> int:
    """The 1-based file line of DataFrame row ``row``, counting the blank lines the reader skipped (and, in a
    quoted file, the newlines inside quoted values).

    Computed only when an error is reported, by scanning the file again.
    """
    path, header = df.attrs.get("path"), df.attrs.get("header_lines", 0)
    if path is None or path.endswith(".parquet"):
        return row + 1
    fmt = df.attrs.get("format", {})
    if fmt.get("quote"):
        with open(path, encoding=fmt["encoding"], newline="") as f:
            reader = csv.reader(f, delimiter=fmt["sep"], quotechar=fmt["quote"])
            seen, start = -header, 1
            for record in reader:
                if record:
                    if seen == row:
                        return start
                    seen += 1
                start = reader.line_num + 1
        return row + header + 1
    seen = -header
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip(b"\r\n"):
                if seen == row:
                    return number
                seen += 1
    return row + header + 1


def read_table(src: TableSource, base: Path, what: str) -> pd.DataFrame:
    """A table of a generic source (CSV-like text or Parquet), every value as text."""
    path = resolve_inside(base, src.path, what)
    if path.suffix == ".parquet":
        if not path.is_file():
            raise DataError(f"missing file: {path}")
        df = pq.read_table(path).to_pandas()
        df = df.astype({c: str for c in df.columns})
        df.attrs["path"], df.attrs["header_lines"] = str(path), 0  # a 'line' is a row number (1-based) here
        return df
    names = list(src.column_names) if not src.has_header else None
    if not src.has_header and not src.column_names:
        raise SchemaError(f"{what}: a table without a header needs 'column_names'")
    return read_delimited(path, src.sep, names, src.encoding, src.quote)


def to_number(df: pd.DataFrame, column: str, what: str = "a number", shown: str | None = None) -> np.ndarray:
    """Column as float64; a value that is not a number raises a DataError with its file, line and column
    (``shown``: the column's name in the file, where it was renamed)."""
    if column not in df.columns:
        raise DataError(f"{df.attrs.get('path', 'table')}: missing column {shown or column!r}; columns are "
                        f"{list(df.columns)}")
    values = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(np.isnan(values))
    if bad.size:
        i = int(bad[0])
        line = line_of(df, i)
        raise DataError(f"{df.attrs.get('path', 'table')}, line {line}, column {shown or column!r}: "
                        f"{df[column].iloc[i]!r} is not {what} ({bad.size} such rows)")
    return values


def require_columns(df: pd.DataFrame, columns: list[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{df.attrs.get('path', 'table')}: missing column(s) {missing}; "
                        f"columns are {list(df.columns)}")


# --------------------------------------------------------------------------------------------------
# MovieLens
# --------------------------------------------------------------------------------------------------

ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
                 "Thriller", "War", "Western"]


def recbole_ml100k_dir() -> Path | None:
    spec = importlib_util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"
    return path if path.is_dir() else None


def _split_title_year(titles: pd.Series) -> tuple[pd.Series, pd.Series]:
    parts = titles.str.extract(r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)\s*$")
    return parts["title"].fillna(titles).str.strip(), parts["year"].fillna("")


def _read_ml100k(root: Path) -> RawTables:
    if (root / "ml-100k.inter").is_file():  # the recbole atomic-file layout, tab-separated with typed headers
        inter = read_delimited(root / "ml-100k.inter", "\t", None)
        inter.columns = [c.split(":")[0] for c in inter.columns]
        items = read_delimited(root / "ml-100k.item", "\t", None)
        items.columns = [c.split(":")[0] for c in items.columns]
        require_columns(items, ["item_id", "movie_title", "release_year", "class"])
        items = pd.DataFrame({"item_id": items["item_id"], "title": items["movie_title"],
                              "year": items["release_year"], "genres": items["class"].str.replace(" ", "|")})
        users = read_delimited(root / "ml-100k.user", "\t", None)
        users.columns = [c.split(":")[0] for c in users.columns]
        users = users.rename(columns={"zip_code": "zip"})
        files = [root / "ml-100k.inter", root / "ml-100k.item", root / "ml-100k.user"]
    elif (root / "u.data").is_file():  # the official GroupLens folder
        inter = read_delimited(root / "u.data", "\t", ["user_id", "item_id", "rating", "timestamp"])
        raw_items = read_delimited(root / "u.item", "|", ["item_id", "title", "release_date", "video_date", "url",
                                                          *ML100K_GENRES], "latin-1")
        flags = raw_items[ML100K_GENRES].to_numpy() == "1"
        genres = ["|".join(g for g, on in zip(ML100K_GENRES, row, strict=True) if on) for row in flags]
        title, year = _split_title_year(raw_items["title"])
        year = raw_items["release_date"].str[-4:].where(raw_items["release_date"] != "", year)
        items = pd.DataFrame({"item_id": raw_items["item_id"], "title": title, "year": year, "genres": genres})
        users = read_delimited(root / "u.user", "|", ["user_id", "age", "gender", "occupation", "zip"], "latin-1")
        files = [root / "u.data", root / "u.item", root / "u.user"]
    else:
        raise DataError(f"{root}: not a MovieLens-100K folder: expected ml-100k.inter (recbole layout) or u.data "
                        "(GroupLens layout)")
    require_columns(inter, ["user_id", "item_id", "rating", "timestamp"])
    return RawTables(inter, users, items, has_timestamp=True, files=files, interactions_file=files[0])


def _read_ml1m(root: Path) -> RawTables:
    if (root / "ratings.dat").is_file():
        ratings, has_ts = root / "ratings.dat", True
        inter = read_delimited(ratings, "::", ["user_id", "item_id", "rating", "timestamp"], "latin-1")
    elif (root / "ratings_no_timestamp.dat").is_file():
        ratings, has_ts = root / "ratings_no_timestamp.dat", False
        inter = read_delimited(ratings, "::", ["user_id", "item_id", "rating"], "latin-1")
    else:
        raise DataError(f"{root}: not a MovieLens-1M folder: expected ratings.dat or ratings_no_timestamp.dat")
    movies = read_delimited(root / "movies.dat", "::", ["item_id", "title", "genres"], "latin-1")
    title, year = _split_title_year(movies["title"])
    items = pd.DataFrame({"item_id": movies["item_id"], "title": title, "year": year, "genres": movies["genres"]})
    users = read_delimited(root / "users.dat", "::", ["user_id", "gender", "age", "occupation", "zip"], "latin-1")
    return RawTables(inter, users, items, has_timestamp=has_ts, files=[ratings, root / "movies.dat",
                                                                      root / "users.dat"], interactions_file=ratings)


def default_root(schema: DatasetSchema) -> Path:
    """Where a built-in dataset lives when neither the command line nor the schema says."""
    if schema.source.format == "movielens-100k":
        found = recbole_ml100k_dir()
        if found is None:
            raise DataError("MovieLens-100K: the recbole package is not installed and no folder was given "
                            "(pass --raw DIR with u.data or ml-100k.inter)")
        return found
    if schema.source.format == "movielens-1m":
        candidates = [Path(os.environ["RECSYS_DATA_DIR"]) / "ml-1m"] if "RECSYS_DATA_DIR" in os.environ else []
        here = Path(__file__).resolve().parents[2]
        candidates += [Path.cwd() / "../shared/data/ml-1m", here / "../shared/data/ml-1m"]
        for c in candidates:
            if c.is_dir():
                return c.resolve()
        raise DataError("MovieLens-1M: no folder given and none found at "
                        f"{[str(c) for c in candidates]}; pass --raw DIR (a GroupLens ml-1m folder)")
    raise SchemaError(f"{schema.where}: source.root is required for format {schema.source.format!r}")


def read_source(schema: DatasetSchema, root: Path | None = None) -> RawTables:
    """Read the raw tables a schema describes. ``root`` (from the command line) overrides the schema's."""
    src = schema.source
    if root is None and src.root is not None:
        base = schema.path.parent if schema.path else Path.cwd()
        root = resolve_inside(base, src.root, f"{schema.where}: source.root")
    if root is None:
        root = default_root(schema)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist")
    if src.format == "movielens-100k":
        return _read_ml100k(root)
    if src.format == "movielens-1m":
        return _read_ml1m(root)
    return _read_generic(schema, root)


def _read_generic(schema: DatasetSchema, root: Path) -> RawTables:
    src = schema.source
    if src.interactions is None:
        raise SchemaError(f"{schema.where}: source.interactions is required for format 'table'")
    w = schema.where
    inter = read_table(src.interactions, root, f"{w}: source.interactions")
    names = {"item_id": src.item_column}
    if src.user_column:  # a dataset without user ids has no user entity (and no histories)
        names["user_id"] = src.user_column
    if src.timestamp_column:
        names["timestamp"] = src.timestamp_column
    elif src.timestamp_column is None and "timestamp" in inter.columns:
        names["timestamp"] = "timestamp"
    missing = [f"{c!r} (source.{k})" for k, c in (("item_column", src.item_column), ("user_column", src.user_column),
                                                  ("timestamp_column", src.timestamp_column))
               if c and c not in inter.columns]
    if missing:
        raise DataError(f"{inter.attrs['path']}: the schema names column(s) {', '.join(missing)}, which the file "
                        f"does not have; its columns are {list(inter.columns)}")
    inter = inter.rename(columns={v: k for k, v in names.items()})
    files = [resolve_inside(root, src.interactions.path, w)]
    side = {}
    for part, key in (("users", "user_id"), ("items", "item_id")):
        t: TableSource | None = getattr(src, part)
        if t is None:
            side[part] = None
            continue
        if key not in inter.columns:
            raise SchemaError(f"{w}: source.{part} is given but the interactions have no {key} "
                              f"(source.{'user' if part == 'users' else 'item'}_column is not set)")
        df = read_table(t, root, f"{w}: source.{part}")
        own_key = t.key or (src.user_column if part == "users" else src.item_column)
        require_columns(df, [own_key])
        side[part] = df.rename(columns={own_key: key})
        files.append(resolve_inside(root, t.path, w))
    return RawTables(inter, side["users"], side["items"], has_timestamp="timestamp" in names, files=files,
                     interactions_file=files[0], source_names=names)
