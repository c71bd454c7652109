"""python -m embedding_jobs.row_tokens --dataset DATA --out DIR [--model PLM]

Every row of a prepared dataset as text, tokenised once for a language model that reads rows (ClickPrompt):
"<field> is <value>." for every field but the label, in schema order, the field named by its name as words
(``hist item id is 50, 181, 100.``): short, so that a row fits the model's length. A sequence field gives its
last ``--history-values`` values, a multi-valued field all of its values.

Output, beside nothing else in DIR::

    train.parquet valid.parquet test.parquet   input_ids: fixed_size_list<int32>[max_length] (padded with the
                                               tokenizer's pad id), length: int32 (tokens before padding);
                                               row groups aligned with the split's, row for row
    meta.json                                  tokenizer and its files' hash, max length, template, the
                                               dataset's fingerprint, rows and truncated rows per split

The trainer reads these files beside the split (``Batch.extras``: ``input_ids``, ``length``), so training never
tokenises. A split is written to a temporary name and renamed when complete: a rerun skips finished splits.
A text longer than ``--max-length`` tokens is cut (its special end token kept) and counted, never an error.

Example:
  python -m embedding_jobs.row_tokens --dataset runs/data/ml-100k --out runs/features/ml-100k/row_tokens
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from embedding_jobs.model_files import ModelError, packaged_minilm, resolve_model_path, setup_job_cli
from embedding_jobs.prepared import SPLITS, PreparedData
from embedding_jobs.templates import FEATURE_TEMPLATE, TEMPLATE_VERSION, display_name
from recsys.data.schema import FIRST_ID, FieldKind
from recsys.data.sources import DataError

log = logging.getLogger("embedding_jobs.row_tokens")

ROW_TEMPLATE_VERSION = 1
META = "meta.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "merges.txt", "vocab.json")


def tokenizer_hash(folder: Path) -> str:
    """sha256 over the tokenizer's files: a cache made with another tokenizer is refused."""
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = folder / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def sentence(field: str, value: str) -> str:
    return FEATURE_TEMPLATE.format(field=display_name(field), value=value)


class RowTexts:
    """Renders a split's rows as text, a field at a time (each id's sentence is made once)."""

    def __init__(self, data: PreparedData, history_values: int) -> None:
        self.data, self.history_values = data, history_values
        self.fields = list(data.schema.fields)
        self.sentences: dict[str, np.ndarray] = {}
        for f in self.fields:
            if f.kind in (FieldKind.CATEGORICAL,):
                words = data.vocab_text(f)
                self.sentences[f.name] = np.array(
                    ["" if i < FIRST_ID else sentence(f.name, words[i]) for i in range(len(words))], dtype=object)

    def render(self, table: pa.Table) -> list[str]:
        parts = []
        for f in self.fields:
            col = table.column(f.name)
            if f.kind is FieldKind.CATEGORICAL:
                parts.append(self.sentences[f.name][col.to_numpy().astype(np.int64)])
            elif f.kind is FieldKind.DENSE:
                parts.append(np.array([sentence(f.name, f"{v:g}") for v in col.to_numpy()], dtype=object))
            elif f.kind is FieldKind.TEXT:
                parts.append(np.array([sentence(f.name, v) if v else "" for v in col.to_pylist()], dtype=object))
            else:  # multi-valued and sequence fields: their values, a sequence's most recent few
                words = self.data.vocab_text(f)
                keep = slice(-self.history_values, None) if f.kind is FieldKind.SEQUENCE else slice(None)
                parts.append(np.array([
                    sentence(f.name, ", ".join(words[i] for i in ids[keep] if i >= FIRST_ID))
                    if any(i >= FIRST_ID for i in ids[keep]) else "" for ids in col.to_pylist()], dtype=object))
        return [" ".join(p for p in row if p) for row in zip(*parts, strict=True)]


def _encode(tokenizer, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Token ids padded to ``max_length``, lengths, and how many texts were cut (keeping their end token)."""
    encoded = tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
    ids = np.full((len(encoded), max_length), tokenizer.pad_token_id, dtype=np.int32)
    lengths = np.empty(len(encoded), dtype=np.int32)
    truncated = 0
    for r, tokens in enumerate(encoded):
        if len(tokens) > max_length:
            tokens = tokens[: max_length - 1] + tokens[-1:]
            truncated += 1
        ids[r, : len(tokens)] = tokens
        lengths[r] = len(tokens)
    return ids, lengths, truncated


def write_split(data: PreparedData, split: str, tokenizer, texts: RowTexts, out: Path, max_length: int,
                progress: bool) -> dict:
    """Tokenise one split into ``out/<split>.parquet``, one row group per row group of the split."""
    source = pq.ParquetFile(data.folder / f"{split}.parquet")
    columns = [f.name for f in texts.fields]
    tmp = out / f".{split}.parquet.tmp-{os.getpid()}"
    writer = None
    truncated = rows = 0
    schema = pa.schema([("input_ids", pa.list_(pa.int32(), max_length)), ("length", pa.int32())])
    bar = tqdm(total=source.metadata.num_rows, desc=f"row tokens {split}", unit="row", disable=not progress)
    try:
        writer = pq.ParquetWriter(tmp, schema, compression="zstd")
        for g in range(source.metadata.num_row_groups):
            group = source.read_row_group(g, columns=columns)
            ids, lengths, cut = _encode(tokenizer, texts.render(group), max_length)
            table = pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), max_length),
                              "length": pa.array(lengths)}, schema=schema)
            writer.write_table(table, row_group_size=max(1, group.num_rows))
            truncated += cut
            rows += group.num_rows
            bar.update(group.num_rows)
        writer.close()
        writer = None
        os.replace(tmp, out / f"{split}.parquet")
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return {"rows": rows, "truncated": truncated}


def run(dataset: Path, out: Path, model: Path, max_length: int, history_values: int, progress: bool) -> dict:
    from transformers import AutoTokenizer

    data = PreparedData.open(dataset)
    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True, trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        raise ModelError(f"{model}: the tokenizer has no pad token; rows of different lengths cannot be batched")
    limit = getattr(tokenizer, "model_max_length", max_length) or max_length
    if max_length > limit:
        raise ModelError(f"--max-length {max_length} is above the tokenizer's limit {limit}")
    meta = {"format": "row_tokens", "version": ROW_TEMPLATE_VERSION, "template_version": TEMPLATE_VERSION,
            "tokenizer": str(model), "tokenizer_hash": tokenizer_hash(model), "max_length": max_length,
            "history_values": history_values, "pad_id": int(tokenizer.pad_token_id),
            "dataset_name": data.schema.name, "dataset_fingerprint": data.schema.fingerprint, "splits": {}}
    out.mkdir(parents=True, exist_ok=True)
    previous = json.loads((out / META).read_text()) if (out / META).is_file() else None
    if previous is not None and {k: v for k, v in previous.items() if k != "splits"} != {
            k: v for k, v in meta.items() if k != "splits"}:
        raise DataError(f"{out} holds row tokens made otherwise (another tokenizer, length or dataset); "
                        "choose another --out or remove it")
    done = previous["splits"] if previous else {}
    texts = RowTexts(data, history_values)
    for split in SPLITS:
        if split in done and (out / f"{split}.parquet").is_file():
            log.info("%s: already tokenised (%d rows)", split, done[split]["rows"])
            continue
        done[split] = write_split(data, split, tokenizer, texts, out, max_length, progress)
        meta["splits"] = done
        (out / META).write_text(json.dumps(meta, indent=2) + "\n")  # after each split: a rerun resumes
        d = done[split]
        log.info("%s: %d rows, %d (%.1f%%) cut at %d tokens", split, d["rows"], d["truncated"],
                 100 * d["truncated"] / max(1, d["rows"]), max_length)
    meta["splits"] = done
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def read_meta(folder: str | Path) -> dict:
    path = Path(folder) / META
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: make the row tokens with `python -m embedding_jobs.row_tokens`")
    meta = json.loads(path.read_text())
    missing = [s for s in SPLITS if s not in meta.get("splits", {}) or not (Path(folder) / f"{s}.parquet").is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: row tokens of {missing} are not written yet; rerun the row_tokens job")
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m embedding_jobs.row_tokens", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, type=Path, help="a prepared dataset folder")
    p.add_argument("--out", required=True, type=Path, help="folder for the token files")
    p.add_argument("--model", type=Path, default=None, help="the language model's folder (its tokenizer); "
                   "default: the packaged all-MiniLM-L6-v2")
    p.add_argument("--max-length", type=int, default=128, help="tokens per row, special tokens included")
    p.add_argument("--history-values", type=int, default=3, help="values of each sequence field, most recent")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_job_cli(args.verbose, None)
    try:
        model = resolve_model_path(args.model) if args.model else packaged_minilm()
        meta = run(args.dataset, args.out, model, args.max_length, args.history_values, not args.no_progress)
    except (DataError, ModelError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cut = sum(s["truncated"] for s in meta["splits"].values())
    rows = sum(s["rows"] for s in meta["splits"].values())
    print(f"row tokens of {rows:,} rows in {args.out} ({cut:,} cut at {args.max_length} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
