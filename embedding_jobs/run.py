"""Embed the fields, feature values, users or items of a prepared dataset into a Parquet feature table.

Texts come from versioned templates over the dataset's vocabularies (user texts from the training split
only); a language model (vLLM or transformers, from a local folder) embeds them; the vectors go to
OUT/<entity>/ (feature tables: OUT/feature/<field>/) as part files plus a manifest, merged into
table.parquet once every part exists. A rerun after a crash skips the finished parts. Split the work over
processes or nodes with --shard I --num-shards N (the same --out, on shared storage).

A model adapted by `python -m embedding_jobs.ctr_adapt` (ELEC; its folder holds elec_head.json) embeds users
and items only, and stores T(meanpool(last hidden states)), the adapted representation: mean pooling, no
normalisation, and the max length and history options of its training unless given here.

Example:
  python -m embedding_jobs.run --entity all --dataset runs/data/ml-100k --out runs/features/ml-100k \\
      --engine vllm
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from embedding_jobs.elec_head import HeadConfig, read_head_config
from embedding_jobs.engines import (
    DTYPES,
    EngineKind,
    EngineOptions,
    EngineUnavailable,
    VLLMOptions,
    describe_model,
    make_engine,
)
from embedding_jobs.jobs import JobOptions, run_job
from embedding_jobs.model_files import ModelError, Pooling, packaged_minilm, resolve_model_path, setup_job_cli
from embedding_jobs.templates import TemplateOptions
from recsys.data.sources import DataError
from recsys.features.table import TEXT_ENTITIES, FeatureEntity, FeatureTableError

log = logging.getLogger("embedding_jobs")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m embedding_jobs.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entity", required=True, nargs="+", choices=[*(e.value for e in TEXT_ENTITIES), "all"],
                   help="what to embed: one or more entities (one engine start-up for all), or all")
    p.add_argument("--dataset", required=True, type=Path, help="a prepared dataset folder (python -m recsys.prepare)")
    p.add_argument("--out", required=True, type=Path, help="root folder of the feature tables")
    p.add_argument("--model", type=Path, default=None,
                   help="local model folder (default: the packaged all-MiniLM-L6-v2); hub names cannot load offline")
    p.add_argument("--engine", choices=[e.value for e in EngineKind], default=EngineKind.VLLM.value,
                   help="vllm (large decoders, GPUs) or transformers (small encoders on CPU)")
    p.add_argument("--batch-size", type=int, default=64, help="texts per engine call")
    p.add_argument("--part-size", type=int, default=1024, help="texts per part file (unit of resumption/sharding)")
    p.add_argument("--pooling", choices=[x.value for x in Pooling], default=None,
                   help="default: the model's own (sentence-transformers), else last token for decoders, else mean")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="L2-normalise vectors (default: yes; no for an ELEC-adapted model, which refuses it)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per text (default: the model's limit)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--history-length", type=int, default=None,
                   help=f"interactions in a user's text, 0: the profile only (default: "
                        f"{TemplateOptions.history_length}, or the one an ELEC-adapted model was trained with)")
    p.add_argument("--history-item-field", default=None,
                   help="field that names an item in user texts (default: title if present, else item_id; or the "
                        "one an ELEC-adapted model was trained with)")
    p.add_argument("--history-outcomes", action=argparse.BooleanOptionalAction, default=None,
                   help="name each history item's rating or click in user texts (default: yes; or as an "
                        "ELEC-adapted model was trained, which is without)")
    p.add_argument("--shard", type=int, default=0, help="this process's shard, 0..N-1")
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float, default=VLLMOptions.gpu_memory_utilization,
                   help="vLLM: fraction of GPU memory, or on CPU of RAM, for the KV cache")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM: GPUs per model")
    p.add_argument("--enable-prefix-caching", action="store_true", help="vLLM: reuse shared prompt prefixes")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="vLLM: no graph capture/compilation (default: eager on CPU, CUDA graphs on GPUs)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for the transformers engine (default: torch's choice; on a busy "
                        "machine fewer threads than cores can be faster)")
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the model")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="show vLLM's and transformers' own logs")
    return p


def template_options(args: argparse.Namespace, head: HeadConfig | None) -> TemplateOptions:
    """The command line's template options; for an ELEC-adapted model, those of its training where not given."""
    trained = TemplateOptions(**head.template_options) if head else TemplateOptions()
    options = replace(trained, **{k: v for k, v in (("history_length", args.history_length),
                                                    ("history_item_field", args.history_item_field),
                                                    ("history_outcomes", args.history_outcomes)) if v is not None})
    if head and options != trained:
        log.warning("the model was adapted on user texts made with %s, this job makes them with %s: the vectors "
                    "will not be the ones it was trained with", trained, options)
    return options


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_job_cli(args.verbose, args.threads)
    try:
        engine_options = EngineOptions(
            model=args.model or packaged_minilm(), pooling=Pooling(args.pooling) if args.pooling else None,
            normalize=args.normalize, batch_size=args.batch_size, max_length=args.max_length, dtype=args.dtype,
            trust_remote_code=args.trust_remote_code)
        vllm_options = VLLMOptions(gpu_memory_utilization=args.gpu_memory_utilization,
                                   tensor_parallel_size=args.tensor_parallel_size,
                                   enable_prefix_caching=args.enable_prefix_caching, enforce_eager=args.enforce_eager)
        entities = TEXT_ENTITIES if "all" in args.entity else tuple(FeatureEntity(e) for e in args.entity)
        job = JobOptions(entities=entities, dataset=args.dataset, out=args.out,
                         batch_size=args.batch_size, part_size=args.part_size, shard=args.shard,
                         num_shards=args.num_shards, progress=args.progress,
                         templates=template_options(args, read_head_config(resolve_model_path(engine_options.model))))
        kind = EngineKind(args.engine)
        model = describe_model(engine_options, kind)
        log.info("model %s (weights sha256 %s…), %s engine, %s pooling, normalize=%s, max %d tokens, head %s",
                 model.model_path, model.weights_hash[:12], kind, model.pooling, model.normalize, model.max_length,
                 model.head or "none")
        result = run_job(job, model, lambda: make_engine(kind, engine_options, vllm_options))
    except (ModelError, DataError, FeatureTableError, EngineUnavailable, FileNotFoundError, ValueError) as e:
        log.error("%s", e, exc_info=args.verbose)
        return 2
    for t in result.tables:
        log.info("%s: %d keys, %d/%d parts written now (%.1f s), %d found done, %d truncated%s", t.folder,
                 t.num_keys, t.parts_written, t.parts_total, t.embed_seconds, t.parts_found, t.truncated,
                 ", merged" if t.merged else "")
    print(f"embedding_jobs.run --entity {' '.join(args.entity)}: {result.summary()}", flush=True)
    return 0


if __name__ == "__main__":  # required: vLLM starts its workers with spawn, which re-imports this module
    sys.exit(main())
