"""python -m recsys.serve.score --model EXPORT_DIR --input REQUESTS.parquet --out SCORES.parquet

Score a Parquet file of requests with an exported model (python -m recsys.serve.export). Requests hold the
model's feature columns as prepared ids, the layout of a prepared split (``runs/data/<dataset>/test.parquet``
is one): unknown raw values map to id 1 upstream, exactly as preparation does. The output has one row per
request, in order: ``logit`` and ``score`` (the click probability). With a ``label`` column the AUC and
logloss are printed too. No language model is read, and no feature table but the one an SRP4CTR export carries
(its cached history encodings).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from recsys.data.loader import make_batch, table_chunk
from recsys.data.schema import FieldKind
from recsys.serve.artifact import ExportedModel, load_exported

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request file the model cannot score; the message names the column and row."""


def check_requests(t: pa.Table, model: ExportedModel, where: str, first_row: int) -> None:
    for f in (*model.schema.sparse_fields, *model.schema.dense_fields):  # text fields are not model inputs
        if f.name not in t.column_names:
            raise RequestError(f"{where}: column {f.name!r} is missing (the model reads "
                               f"{[x.name for x in (*model.schema.sparse_fields, *model.schema.dense_fields)]})")
        col = t.column(f.name)
        if f.kind is FieldKind.DENSE:
            values = col.to_numpy(zero_copy_only=False).astype(np.float64)
            bad = np.flatnonzero(~np.isfinite(values))
            if len(bad):
                raise RequestError(f"{where}: column {f.name!r} row {first_row + int(bad[0])} is {values[bad[0]]}")
            continue
        rows = np.arange(len(col))
        if f.kind is not FieldKind.CATEGORICAL:  # a list per row: check every value, report its row
            rows = pc.list_parent_indices(col).to_numpy()
            col = pc.list_flatten(col)
        ids = col.to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(_nan(ids) | (ids < 0) | (ids >= f.vocab_size)) if len(ids) else []
        if len(bad):
            raise RequestError(f"{where}: column {f.name!r} row {first_row + int(rows[bad[0]])} has id {ids[bad[0]]}, "
                               f"outside the model's vocabulary [0, {f.vocab_size}); map unknown values to 1")


def _nan(ids: np.ndarray) -> np.ndarray:
    return np.isnan(ids) if ids.dtype.kind == "f" else np.zeros(len(ids), bool)


def score_file(model: ExportedModel, src: str | Path, out: str | Path, batch_size: int = 4096,
               progress: bool = True) -> dict:
    """Score every row of ``src``; with labels, AUC and logloss (and, for a prepared split, per regime)."""
    src, out = Path(src), Path(out)
    if not src.is_file():
        raise FileNotFoundError(f"request file {src} does not exist")
    file = pq.ParquetFile(src)
    schema = model.schema
    sparse, dense = list(schema.sparse_fields), [f.name for f in schema.dense_fields]
    columns = [f.name for f in (*sparse, *schema.dense_fields)] + (["label"] if "label" in file.schema_arrow.names
                                                                   else [])
    logits, labels, row = [], [], 0
    with tqdm(total=file.metadata.num_rows, unit="row", desc="scoring", disable=not progress) as bar:
        for rb in file.iter_batches(batch_size=batch_size, columns=[c for c in columns if c in file.schema_arrow.names]):
            t = pa.Table.from_batches([rb])
            check_requests(t, model, str(src), row)
            chunk = table_chunk(t, sparse, dense)
            batch = make_batch(chunk, [f.name for f in sparse], len(chunk))
            logits.append(model.score(batch))
            labels.append(chunk.labels)
            row += t.num_rows
            bar.update(t.num_rows)
    logit = torch.cat(logits) if logits else torch.zeros(0)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    pq.write_table(pa.table({"logit": logit.numpy().astype(np.float32),
                             "score": torch.sigmoid(logit).numpy().astype(np.float32)}), tmp)
    tmp.replace(out)
    result: dict[str, float] = {"rows": float(row)}
    if "label" in columns and row:
        from recsys.data.schema import REGIME_COLUMNS
        from recsys.train.metrics import evaluate_predictions, regime_metrics

        y = torch.from_numpy(np.concatenate(labels))
        result.update(evaluate_predictions(logit, y, torch.ones_like(y)))
        present = [c for c in REGIME_COLUMNS if c in file.schema_arrow.names]
        if present:  # a prepared split: the same regimes as the trainer reports
            t = pq.read_table(src, columns=present)
            cols = [torch.from_numpy(t.column(c).to_numpy().astype(np.int64)) if c in present else None
                    for c in REGIME_COLUMNS]
            result.update(regime_metrics(torch.sigmoid(logit.double()), y.double(), *cols))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recsys.serve.score", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an exported model folder")
    p.add_argument("--input", required=True, help="a Parquet file of requests (prepared ids)")
    p.add_argument("--out", required=True, help="the Parquet file of scores to write")
    p.add_argument("--metrics", default=None, help="also write the AUC and logloss (with labels) to this JSON file")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    try:
        model = load_exported(args.model)
        result = score_file(model, args.input, args.out, args.batch_size, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as e:
        print(f"scoring failed: {e}", file=sys.stderr)
        return 2
    if args.metrics:
        Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
        Path(args.metrics).write_text(json.dumps({"model": args.model, "input": args.input, **result}, indent=2) + "\n")
    extra = "".join(f", {k} {v:.4f}" for k, v in result.items() if k in ("auc", "logloss"))
    print(f"scored {int(result['rows'])} rows of {args.input} with {model.meta['backbone']} -> {args.out}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
