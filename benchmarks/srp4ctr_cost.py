"""SRP4CTR's serving cost: scoring from cached history encodings against re-encoding the history for every
candidate, FLOPs and latency side by side, in one process.

    python -m benchmarks.srp4ctr_cost --dataset ml-100k --backbone deepfm

The run is ``benchmarks.quality``'s ``srp_both`` run of seed 1 (trained if missing). Its encoder's output of
every test history is cached in memory exactly as ``embedding_jobs.history_encodings`` writes it, then the same
task scores the same batches two ways: ``cached`` (a lookup, then the cross-attention and the Q-Former) and
``re-encoded`` (the bidirectional encoder over the history, for every row). Batches: one user's row against 100
candidate items (the item's own fields from 100 other test rows; the user, context and history stay), and 4,096
test rows. FLOPs come from ``torch.utils.flop_counter`` (matrix products and attention; lookups count 0), latency
is the median over interleaved rounds. Scores of the two ways are checked equal. Results:
benchmarks/results/srp4ctr_cost_<dataset>.{md,json}.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import REPO, RESULTS, environment, environment_line, interleaved_medians, write_json
from benchmarks.quality import prepare_data, run_name, run_one
from embedding_jobs.history_encodings import encode_histories, load_srp_run
from recsys.data.loader import make_batch, table_chunk
from recsys.data.schema import Entity, FieldKind
from recsys.methods.srp4ctr_cache import HistoryCache, cache_metadata


def _candidates(test: pa.Table, schema, n: int) -> pa.Table:
    """One row with a history, repeated ``n`` times with the item's own fields of ``n`` other rows."""
    hist = test.column(schema.field("hist_item_id").name).to_pylist()
    user_row = next(i for i, h in enumerate(hist) if len(h) >= 5)
    rows = test.take([user_row] * n)
    others = test.take(np.random.default_rng(0).choice(len(test), n, replace=False))
    item_fields = [f.name for f in schema.fields if f.entity is Entity.ITEM and f.kind is not FieldKind.SEQUENCE
                   and f.name in test.column_names]
    for name in item_fields:
        rows = rows.set_column(rows.column_names.index(name), name, others.column(name))
    return rows


def _flops(fn) -> int:
    # the counter does not see the fused fast path of nn.TransformerEncoderLayer / MultiheadAttention in eval
    # mode: count the same computation through the plain operators
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return counter.get_total_flops()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-100k", choices=["ml-100k"])
    p.add_argument("--backbone", default="deepfm")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=50)
    args = p.parse_args()
    torch.set_num_threads(1)  # a serving thread; both ways alike
    data = prepare_data(args.dataset)
    run_one(args.dataset, args.dataset, args.backbone, 1, ["method.name=srp4ctr"], "srp_both")
    run = REPO / "runs" / "bench" / run_name(args.dataset, args.backbone, 1, "srp_both")
    task, schema, _ = load_srp_run(run)
    task.requires_grad_(False)  # serving holds no autograd state (FlopCounterMode's module hooks trip on it)
    keys, vectors = encode_histories(task, schema, data, ("test",), progress=False)
    f = task.fields
    meta = cache_metadata(fields=f.all, length=f.length, dim=task.model.embedding_dim, num_rows=len(keys),
                          weights_hash="", dataset_name=schema.name, fingerprint=schema.fingerprint, run=str(run),
                          splits=("test",), created_at="")
    cache = HistoryCache(keys, torch.from_numpy(vectors), f.length, task.model.embedding_dim, meta, "memory")

    test = pq.read_table(data / "test.parquet")
    sparse, dense = list(schema.sparse_fields), [x.name for x in schema.dense_fields]
    names = [x.name for x in sparse]
    batches = {f"1 user x {args.candidates} candidates": _candidates(test, schema, args.candidates),
               f"{args.rows:,} rows": test.slice(0, args.rows)}
    results = {}
    for label, t in batches.items():
        batch = make_batch(table_chunk(t, sparse, dense), names, t.num_rows)

        def cached(batch=batch) -> torch.Tensor:
            task.use_cache(cache)
            return task.score(batch)

        def encoded(batch=batch) -> torch.Tensor:
            task.use_cache(None)
            return task.score(batch)

        with torch.no_grad():
            same = torch.allclose(cached(), encoded(), atol=1e-5)
            flops = {"cached": _flops(cached), "re-encoded": _flops(encoded)}
            times = interleaved_medians({"cached": cached, "re-encoded": encoded}, args.rounds)
        results[label] = {"rows": t.num_rows, "flops_per_row": {k: v / t.num_rows for k, v in flops.items()},
                          "latency_ms": {k: v * 1e3 for k, v in times.items()},
                          "rows_per_s": {k: t.num_rows / v for k, v in times.items()}, "same_scores": same}
        print(label, results[label], flush=True)
    summary = {"dataset": args.dataset, "backbone": args.backbone, "run": str(run.relative_to(REPO)),
               "command": "python -m benchmarks.srp4ctr_cost " + " ".join(sys.argv[1:]), "threads": 1,
               "histories_cached": len(keys), "results": results, "environment": environment()}
    stem = RESULTS / f"srp4ctr_cost_{args.dataset}"
    write_json(stem.with_suffix(".json"), summary)
    lines = [f"# SRP4CTR serving cost on {args.dataset} ({args.backbone})", "",
             f"Command: `{summary['command']}`; run `{summary['run']}` (seed 1); one thread, median of "
             f"{args.rounds} interleaved rounds. `cached`: the encoder's output read from the history cache (a "
             "lookup), then the cross-attention and the Q-Former; `re-encoded`: the encoder runs over the history "
             "for every row. Both score the same batches to the same logits.", "",
             "| batch | way | FLOPs per row | latency (ms) | rows/s | ratio to cached |", "|---|---|---|---|---|---|"]
    for label, r in results.items():
        for way in ("cached", "re-encoded"):
            lines.append(f"| {label} | {way} | {r['flops_per_row'][way] / 1e6:.2f} M | {r['latency_ms'][way]:.2f} | "
                         f"{r['rows_per_s'][way]:,.0f} | {r['latency_ms'][way] / r['latency_ms']['cached']:.2f}x |")
    lines += ["", f"Same scores both ways: {all(r['same_scores'] for r in results.values())}. "
              f"{len(keys):,} distinct test histories cached.", ""]
    env = summary["environment"]
    lines += [environment_line(env), ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print(f"wrote {stem}.md/.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
