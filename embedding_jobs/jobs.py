"""One embedding job: texts of some entities -> engine -> feature table parts -> merged tables.

The engine starts once per job, and only when this shard has unfinished parts, so a rerun of a finished
job costs seconds. Parts are numbered over all tables of the job (a feature job writes one table per
field), and shard ``I`` of ``N`` takes every part whose number is ``I`` modulo ``N``: the shards' parts
together are the tables.

With an ELEC-adapted model (``embedding_jobs.ctr_adapt``: the folder holds ``elec_head.json``), the user and
item tables store the adapted "high-level representation vector" ``r = T(meanpool(H))``: ``H`` the last hidden
states of the entity's text (the same template the adaptation trained on), mean-pooled over the attention
mask without L2 normalisation, and ``T`` the trained transformation MLP; the metadata says
``head="elec_transform"``, ``dim`` is T's output size. Field and feature entities are refused for such a
model: its head was trained on user and item texts only (embed them with the base model).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from embedding_jobs.engines import Engine, ModelInfo
from embedding_jobs.prepared import PreparedData
from embedding_jobs.table_writer import TableFolder, TablePlan
from embedding_jobs.templates import (
    TEMPLATE_VERSION,
    TemplateOptions,
    TextTable,
    build_texts,
    relevant_options,
    template_hash,
)
from recsys.data.sources import DataError
from recsys.features.table import FeatureEntity, FeatureTableMetadata

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobOptions:
    entities: tuple[FeatureEntity, ...]  # one engine start-up embeds them all
    dataset: Path  # a prepared dataset (python -m recsys.prepare)
    out: Path  # tables go to OUT/<entity>, feature tables to OUT/feature/<field>
    batch_size: int = 64  # texts per engine call
    part_size: int = 1024  # texts per part file: the unit of work, of resumption and of sharding
    shard: int = 0
    num_shards: int = 1
    templates: TemplateOptions = TemplateOptions()
    progress: bool = True

    def __post_init__(self) -> None:
        if self.num_shards < 1 or not 0 <= self.shard < self.num_shards:
            raise ValueError(f"shard must be in 0..num_shards-1, got shard {self.shard} of {self.num_shards}")
        if not self.entities:
            raise ValueError("entities is empty: nothing to embed")
        if self.batch_size < 1 or self.part_size < 1:
            raise ValueError("batch_size and part_size must be >= 1")


@dataclass
class TableResult:
    folder: Path
    num_keys: int
    parts_total: int
    parts_written: int = 0  # by this run
    parts_found: int = 0  # finished before this run started (an earlier run or another shard)
    texts_embedded: int = 0
    embed_seconds: float = 0.0  # embedding and writing this table's parts, in this run
    truncated: int = 0
    merged: bool = False


@dataclass
class JobResult:
    tables: list[TableResult] = field(default_factory=list)
    seconds: float = 0.0  # the whole job: texts, engine start-up, embedding, writing, merging
    embed_seconds: float = 0.0  # embedding and writing parts only
    engine_started: bool = False

    @property
    def texts_embedded(self) -> int:
        return sum(t.texts_embedded for t in self.tables)

    def summary(self) -> str:
        texts = self.texts_embedded
        rate = texts / self.embed_seconds if self.embed_seconds > 0 else 0.0
        merged = sum(t.merged for t in self.tables)
        return (f"{len(self.tables)} table(s), {merged} complete and merged; embedded {texts} texts in "
                f"{self.embed_seconds:.1f} s ({rate:.0f} texts/s; {self.seconds:.1f} s in all, with start-up), "
                f"{sum(t.truncated for t in self.tables)} truncated; "
                f"parts: {sum(t.parts_written for t in self.tables)} written now, "
                f"{sum(t.parts_found for t in self.tables)} found done, of {sum(t.parts_total for t in self.tables)}")


def table_folder(out: Path, table: TextTable) -> Path:
    if table.entity is FeatureEntity.FEATURE:
        return Path(out) / table.entity.value / table.table
    return Path(out) / table.entity.value


def table_metadata(table: TextTable, model: ModelInfo, data: PreparedData, options: TemplateOptions
                   ) -> FeatureTableMetadata:
    return FeatureTableMetadata(
        entity=table.entity, table=table.table, num_rows=table.num_rows, dim=model.dim, model_name=model.model_name,
        model_path=model.model_path, weights_hash=model.weights_hash, engine=model.engine.value,
        pooling=model.pooling.value, normalize=model.normalize, max_length=model.max_length, dtype=model.dtype,
        template_version=TEMPLATE_VERSION, template_hash=template_hash(table.entity, options),
        template_options=relevant_options(table.entity, options), dataset_name=data.schema.name,
        dataset_fingerprint=data.schema.fingerprint, created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        head=model.head)


def check_nonempty(table: TextTable) -> None:
    for key, text in zip(table.keys, table.texts, strict=True):
        if not text.strip():
            raise DataError(f"{table.entity} table {table.table!r}: key {int(key)} has an empty text: nothing to embed")


@dataclass
class _Work:
    table: TextTable
    folder: TableFolder
    plan: TablePlan
    metadata: FeatureTableMetadata
    done: set[int]  # parts finished before this run
    result: TableResult


def run_job(options: JobOptions, model: ModelInfo, start_engine: Callable[[], Engine]) -> JobResult:
    """Embed every text of ``options.entities`` that this shard owns and has not finished; merge complete tables."""
    began = time.perf_counter()
    other = [e for e in options.entities if e not in (FeatureEntity.USER, FeatureEntity.ITEM)]
    if model.head and other:
        raise ValueError(f"{model.model_path} is ELEC-adapted (head {model.head}, trained on user and item texts "
                         f"only): it embeds users and items, not {', '.join(other)}; embed those with the base model")
    data = PreparedData.open(options.dataset)
    templates = options.templates.resolve(data)
    tables = [t for entity in dict.fromkeys(options.entities) for t in build_texts(data, entity, templates)]
    work = []
    for table in tables:
        check_nonempty(table)
        folder = TableFolder(table_folder(options.out, table))
        plan = TablePlan.for_keys(table.keys, options.part_size)
        metadata = folder.start(table_metadata(table, model, data, templates), plan)
        done = folder.finished_parts(metadata, plan, table.keys)
        work.append(_Work(table, folder, plan, metadata, done,
                          TableResult(folder.root, len(table.keys), plan.num_parts, parts_found=len(done))))

    # Every (table, part) pair numbered in order; this shard takes those equal to its index modulo N.
    units = [(w, i) for w in work for i in range(w.plan.num_parts)]
    mine = [(w, i) for g, (w, i) in enumerate(units) if g % options.num_shards == options.shard]
    pending = [(w, i) for w, i in mine if i not in w.done]
    for w in work:
        log.info("%s %s: %d texts in %d part(s), %d already done -> %s", w.table.entity, w.table.table,
                 len(w.table.keys), w.plan.num_parts, w.result.parts_found, w.folder.root)
    log.info("shard %d of %d: %d of its %d part(s) to embed", options.shard, options.num_shards, len(pending),
             len(mine))

    result = JobResult(tables=[w.result for w in work])
    if pending:
        engine = start_engine()
        result.engine_started = True
        try:
            _check_engine(engine, model)
            embed_began = time.perf_counter()
            _embed_parts(engine, pending, options)
            result.embed_seconds = time.perf_counter() - embed_began
        finally:
            engine.close()
    for w in work:
        w.result.merged = w.folder.merge_if_complete(w.metadata, w.plan)
    result.seconds = time.perf_counter() - began
    return result


def _check_engine(engine: Engine, model: ModelInfo) -> None:
    if engine.info != model:
        raise RuntimeError(f"the engine describes its model as {engine.info}, the job planned with {model}")


def _embed_parts(engine: Engine, pending: list[tuple[_Work, int]], options: JobOptions) -> None:
    total = sum(w.plan.part(i).stop - w.plan.part(i).start for w, i in pending)
    bar = tqdm(total=total, unit="text", desc=f"embed {','.join(options.entities)}", disable=not options.progress,
               dynamic_ncols=True)
    try:
        for w, i in pending:
            began = time.perf_counter()
            part = w.plan.part(i)
            keys = w.table.keys[part]
            texts = w.table.texts[part]
            truncated_before = engine.num_truncated
            # Texts of similar length share a batch (less padding); the order is fixed by the part's texts,
            # so a rerun batches them exactly as the first run did.
            order = np.argsort([len(t) for t in texts], kind="stable")
            vectors = np.zeros((len(texts), engine.dim), np.float32)
            for start in range(0, len(texts), options.batch_size):
                rows = order[start:start + options.batch_size]
                vectors[rows] = engine.embed([texts[r] for r in rows])
                bar.update(len(rows))
            w.folder.write_part(i, w.plan, keys, vectors, w.metadata)
            w.result.parts_written += 1
            w.result.texts_embedded += len(texts)
            w.result.truncated += engine.num_truncated - truncated_before
            w.result.embed_seconds += time.perf_counter() - began
            bar.set_postfix_str(f"{w.table.table} part {i + 1}/{w.plan.num_parts}")
    finally:
        bar.close()
