"""python -m embedding_jobs.history_encodings --run RUN --out DIR [--splits train valid test]

Cache SRP4CTR's history encodings: run a finished SRP4CTR run's frozen encoder once over every distinct
behaviour history in the given splits and write its outputs to a feature table of entity ``history``
(``recsys.methods.srp4ctr_cache``: keyed by a hash of the history, the encoder's weights hash and the
dataset's fingerprint in the metadata). Scoring a candidate then costs only the cross-attention and the
Q-Former: ``python -m recsys.serve.export --run RUN --history-cache DIR`` serves the model from this table,
without the encoder.

The histories are read as stored (the ids before the run's rare-id lookup, which is baked into the model's
tables as an export does), so a served request and this job hash a history alike. The table is written
atomically; a rerun that finds a complete cache from the same encoder over the same data does nothing.

Example:
  python -m embedding_jobs.history_encodings --run runs/train/srp --out runs/features/ml-100k/srp_history
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from embedding_jobs.prepared import SPLITS
from embedding_jobs.table_writer import write_table_file
from recsys.atomic import atomic_dir
from recsys.data.loader import ParquetBatches, embedding_lookup
from recsys.data.schema import PreparedSchema
from recsys.features.reader import read_metadata
from recsys.features.table import MERGED_FILE, FeatureTableError
from recsys.methods.srp4ctr import SRP4CTRTask, padded_ids
from recsys.methods.srp4ctr_cache import cache_metadata, encoder_hash, history_keys
from recsys.modules.embedding import bake_lookup
from recsys.train.checkpoint import load_part
from recsys.train.config import ConfigError

log = logging.getLogger("embedding_jobs.history_encodings")


def load_srp_run(run: Path, checkpoint: str = "best") -> tuple[SRP4CTRTask, PreparedSchema, Path]:
    """A finished SRP4CTR run's task on the CPU, unsharded, in eval mode, with the run's rare-id lookup baked
    into its tables (it then reads stored ids as the trainer's loader fed them); its schema and data folder."""
    from recsys.experiment import build_task, load_config

    cfg = load_config(run / "config.yaml")
    if cfg.method.name != "srp4ctr":
        raise ConfigError(f"{run} trained method {cfg.method.name!r}; history encodings are SRP4CTR's")
    schema = PreparedSchema.load(cfg.data.path)
    task = build_task(schema, cfg, torch.device("cpu"))
    assert isinstance(task, SRP4CTRTask)
    task.set_stage(task.stages[-1])
    load_part(run / "checkpoints" / checkpoint, task)
    bake_lookup(task, embedding_lookup(cfg.data.path, schema, cfg.data.min_count, cfg.data.unlabeled_splits))
    return task.eval(), schema, Path(cfg.data.path)


@torch.no_grad()
def encode_histories(task: SRP4CTRTask, schema: PreparedSchema, data: Path, splits: tuple[str, ...],
                     batch_size: int = 4096, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(keys [N], encodings [N, L * D])`` of every distinct history in ``splits``, sorted by key."""
    f = task.fields
    found: dict[int, np.ndarray] = {}
    for split in splits:
        batches = ParquetBatches(data, split, schema, batch_size)
        for batch in tqdm(batches, desc=f"encoding {split}", unit="batch", disable=not progress):
            keys = history_keys([padded_ids(batch, n, f.length) for n in f.all]).numpy()
            new = np.array([k not in found for k in keys.tolist()])
            new &= batch.weights.numpy() > 0  # never the padding rows of the last batch
            if not new.any():
                continue
            _, seqs, mask = task._sequences(batch)
            encoded = task.fgbert("encode", seqs, mask).reshape(len(keys), -1).numpy()
            for i in np.flatnonzero(new):
                found.setdefault(int(keys[i]), encoded[i])
    keys = np.array(sorted(found), dtype=np.int64)
    vectors = np.stack([found[k] for k in keys.tolist()]) if len(keys) else np.zeros((0, f.length * task.model.embedding_dim),
                                                                                      np.float32)
    return keys, vectors.astype(np.float32)


def run(run_dir: Path, out: Path, splits: tuple[str, ...] = SPLITS, checkpoint: str = "best",
        batch_size: int = 4096, progress: bool = True) -> dict:
    task, schema, data = load_srp_run(run_dir, checkpoint)
    weights = encoder_hash(task.fgbert)
    if (out / MERGED_FILE).is_file():
        try:
            meta = read_metadata(out / MERGED_FILE)
        except FeatureTableError:
            meta = None
        if meta is not None and meta.weights_hash == weights and meta.dataset_fingerprint == schema.fingerprint \
                and meta.template_options.get("splits") == list(splits):
            log.info("%s already holds this encoder's encodings of %s: nothing to do", out, list(splits))
            return {"histories": meta.num_rows, "skipped": True}
    if out.exists() and not (out / MERGED_FILE).is_file() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a history cache: refusing to replace it")
    start = time.perf_counter()
    keys, vectors = encode_histories(task, schema, data, splits, batch_size, progress)
    meta = cache_metadata(fields=task.fields.all, length=task.fields.length, dim=task.model.embedding_dim,
                          num_rows=len(keys), weights_hash=weights, dataset_name=schema.name,
                          fingerprint=schema.fingerprint, run=str(run_dir), splits=splits,
                          created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    with atomic_dir(out) as tmp:
        write_table_file(tmp / MERGED_FILE, keys, vectors, meta)
    seconds = time.perf_counter() - start
    log.info("%d distinct histories of %s encoded in %.1f s -> %s", len(keys), list(splits), seconds, out)
    return {"histories": len(keys), "seconds": seconds, "skipped": False}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m embedding_jobs.history_encodings", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="a finished SRP4CTR training run folder")
    p.add_argument("--out", required=True, type=Path, help="folder of the history cache")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS),
                   help="the splits whose histories are cached (default: all)")
    p.add_argument("--checkpoint", default="best", help="the run's checkpoint (best or last)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = run(args.run, args.out, tuple(args.splits), args.checkpoint, args.batch_size, not args.no_progress)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{result['histories']:,} history encodings in {args.out}" + (" (already there)" if result["skipped"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
