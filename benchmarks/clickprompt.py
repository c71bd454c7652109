"""ClickPrompt on real data: base, mode (b) (the CTR model alone, after warm-up and PA-MLM), mode (a) (CTR
model and language model together), per regime over seeds, and whether the prompts carry information.

    python -m benchmarks.clickprompt --dataset ml-100k --backbones deepfm dcnv2 autoint --seeds 1 2 3
    python -m benchmarks.clickprompt --dataset ml-100k --joint-seeds 1        # mode (a): one seed, on a budget
    python -m benchmarks.clickprompt --dataset ml-100k --backbones deepfm --joint-seeds 1 2 3 --joint-start b
    python -m benchmarks.clickprompt --dataset ml-100k --backbones autoint --joint-seeds --record clickprompt_ml-100k_autoint
    python -m benchmarks.clickprompt --dataset ml-100k --backbones deepfm --joint-seeds --diagnose --record clickprompt_ml-100k_diagnose
    python -m benchmarks.clickprompt --dataset ml-100k --backbones dcnv2 --joint-seeds --diagnose clickprompt_b_tables_pretrained --record clickprompt_ml-100k_diagnose_dcnv2_tables

Steps, each skipped when its output exists (rerun to resume):

1. tokenise every row once for the packaged MiniLM (``embedding_jobs.row_tokens``);
2. per backbone and seed (``benchmarks.quality``'s runs, config benchmarks/configs/<dataset>.yaml):
   ``base`` (shared with the quality records; it is also the control "(b) without PA-MLM": the same CTR model
   trained plainly), ``clickprompt_b`` and, for ``--joint-seeds``, mode (a): ``clickprompt_a`` from the PA-MLM
   weights as in the paper (``--joint-start pretrain``), or ``clickprompt_a_from_b`` from the seed's finished
   (b) run, its scoring head at zero so that it starts at (b)'s scores (``--joint-start b``: what the PLM adds
   to a trained CTR model), beside its control ``clickprompt_b_continued``: the same (b) run's CTR model trained
   on as many rows in batches as small, with fresh optimizers, without the PLM; and ``clickprompt_a_frozen_ctr``:
   the same joint start with the CTR model frozen, so that only the language side learns (its control is (b));
3. the prompt probe on each (b) run's pre-trained weights: masked-LM loss and accuracy on the validation rows
   (the same masks) of the PLM alone, with prompts from the pre-trained CTR model, and with prompts from a
   randomly initialised CTR model. If the prompts carry the row's ID view, the second beats the third;
4. with ``--diagnose``, what in PA-MLM costs (b) its AUC: ``clickprompt_b_fresh`` fine-tunes from zeroed
   embedding-optimizer state (not PA-MLM's Adagrad sums), ``clickprompt_b_dense_pretrained`` runs PA-MLM with the
   embedding tables at rate 0 (the prompts shape only the dense layers), ``clickprompt_b_tables_pretrained`` with
   the CTR model's dense layers at rate 0, and their control ``clickprompt_b_nothing_pretrained``: both at rate 0
   and fine-tuned from zeroed Adagrad state, the base through (b)'s pipeline (``--diagnose`` names the variants;
   none named: the first two). Each starts from the finished (b) stages it would recompute bit for bit (hard
   links), so the first costs a CTR stage and the others a PA-MLM and one. The prompt probe also runs on the
   pre-trained weights of the two that freeze one part: do their prompts still carry the ID view?

On these 2 cores a pass of MiniLM over every training row does not fit, so pre-training runs on a row budget
(``--warmup-steps``, ``--pretrain-steps`` of ``--mlm-batch`` rows per epoch, ``--warmup-epochs`` and
``--pretrain-epochs`` epochs; the record states them; a GPU user raises them); mode (a) fine-tunes for
``--joint-epochs`` of ``--joint-steps`` batches (every other variant on the whole training split) and, as every
variant, is selected and tested on the whole validation and test splits. From the PA-MLM weights that budget
leaves the CTR model trained on a few thousand rows, far from the base, which is why ``--joint-start b``
exists.
Results: benchmarks/results/clickprompt_<data>.{md,json,png}; pair them with
``python -m benchmarks.compare --data <data> --record clickprompt_<data> --variants clickprompt_b ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.common import (
    REPO,
    RESULTS,
    environment,
    environment_line,
    fmt,
    interleaved_medians,
    mean_std,
    python,
    write_json,
)
from benchmarks.quality import data_name, per_seed, prepare_data, regime_table, run_name, run_one
from recsys.train.config import override


def _braced(key: str, value: dict) -> str:
    """A ``key={...}`` override, its braces doubled for ``benchmarks.quality``'s str.format."""
    return override(key, value).replace("{", "{{").replace("}", "}}")


def _per_stage(key: str, **values: int) -> str:
    """A ``train.<key>={stage: n, ...}`` override."""
    return _braced(f"train.{key}", values)


def variants(tokens: Path, args: argparse.Namespace) -> dict[str, list[str]]:
    # the language-model stages take small batches; the CTR stage keeps the benchmark config's batch size
    lm = ("warmup", "pretrain")
    pre = ["method.name=clickprompt", f"method.clickprompt.tokens={tokens}",
           _per_stage("stage_eval_steps", **dict.fromkeys(lm, args.mlm_eval_steps))]
    epochs = {"warmup": args.warmup_epochs, "pretrain": args.pretrain_epochs}
    steps = {"warmup": args.warmup_steps, "pretrain": args.pretrain_steps}
    out = {
        "clickprompt_b": [*pre, "method.clickprompt.finetune=ctr", _per_stage("stage_steps", **steps),
                          _per_stage("stage_epochs", **epochs),
                          _per_stage("stage_batch_size", **dict.fromkeys(lm, args.mlm_batch))],
        # the PLM trains with the CTR model: small batches there too (1,024 rows of MiniLM do not fit in memory)
        "clickprompt_a": [*pre, "method.clickprompt.finetune=joint",
                          _per_stage("stage_steps", **steps, ctr=args.joint_steps),
                          _per_stage("stage_epochs", **epochs, ctr=args.joint_epochs),
                          _per_stage("stage_batch_size", **dict.fromkeys([*lm, "ctr"], args.mlm_batch))],
        **{variant: [
            "method.name=clickprompt", f"method.clickprompt.tokens={tokens}", f"method.clickprompt.finetune={mode}",
            # {tag}, {backbone} and {seed} are filled per run by benchmarks.quality: the same seed's (b) run
            "method.clickprompt.start_from=runs/bench/{tag}_{backbone}_clickprompt_b_s{seed}",
            _per_stage("stage_steps", ctr=args.joint_steps), _per_stage("stage_epochs", ctr=args.joint_epochs),
            _per_stage("stage_batch_size", ctr=args.mlm_batch)]
           for variant, mode in (("clickprompt_a_from_b", "joint"), ("clickprompt_b_continued", "ctr"),
                                 ("clickprompt_a_frozen_ctr", "joint"))},
    }
    fresh = "train.fresh_embedding_optimizer=[ctr]"
    tables_frozen = _braced("train.stage_embedding_lr", {"pretrain": 0.0})
    dense_frozen = _braced("train.stage_group_lr", {"pretrain": {"dense": 0.0}})
    # (b) whose fine-tuning starts with zeroed Adagrad sums, as the reference's separate fine-tuning script starts
    # with a new optimizer: PA-MLM's sums otherwise slow the CTR stage's embedding steps
    out["clickprompt_b_fresh"] = [*out["clickprompt_b"], fresh]
    # (b) whose PA-MLM leaves the embedding tables as initialised (their rate 0 there): the prompts shape only the
    # CTR model's dense layers, so (b)'s loss to the base is the tables' or the dense layers'
    out["clickprompt_b_dense_pretrained"] = [*out["clickprompt_b"], tables_frozen]
    # its mirror: PA-MLM leaves the CTR model's dense layers as initialised (the tables and the prompt generator
    # learn), so (b) fine-tunes from PA-MLM's tables alone
    out["clickprompt_b_tables_pretrained"] = [*out["clickprompt_b"], dense_frozen]
    # the control of the three above: PA-MLM can change nothing of the CTR model and fine-tuning starts from
    # zeroed Adagrad state, so this is the base run through (b)'s pipeline, from another random start (the
    # language model and the planner draw from the same generator first)
    out["clickprompt_b_nothing_pretrained"] = [*out["clickprompt_b"], fresh, tables_frozen, dense_frozen]
    # the CTR model frozen (embeddings and dense layers at rate 0): only the PLM, the prompts and the scoring
    # head learn, so the joint model's change from (b) is the language model's alone
    out["clickprompt_a_frozen_ctr"] += ["optim.embedding_lr=0", _braced("optim.groups", {"dense": {"lr": 0.0}})]
    return out


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


# the stages of (b) that each diagnostic variant would recompute bit for bit, as it changes only what follows
SHARED_STAGES = {"clickprompt_b_fresh": ("warmup", "pretrain"), "clickprompt_b_dense_pretrained": ("warmup",),
                 "clickprompt_b_tables_pretrained": ("warmup",), "clickprompt_b_nothing_pretrained": ("warmup",)}
# what each variant with a PA-MLM of its own keeps of PA-MLM, as the prompt probe's rows name it
OWN_PRETRAIN = {"clickprompt_b_dense_pretrained": "tables frozen in PA-MLM",
                "clickprompt_b_tables_pretrained": "dense layers frozen in PA-MLM"}


def share_stages(data: str, backbone: str, seed: int, variant: str) -> None:
    """Start ``variant``'s run with the seed's finished (b) stages it shares (a resumed run ends where an
    uninterrupted one does, so they need not be recomputed; they are most of a (b) run's time here)."""
    src, dst = (REPO / "runs" / "bench" / run_name(data, backbone, seed, v) for v in ("clickprompt_b", variant))
    if (dst / "stages").exists() or (dst / "test_metrics.json").is_file():
        return
    missing = [st for st in SHARED_STAGES[variant] if not (src / "stages" / st / "stage.json").is_file()]
    if missing:
        raise RuntimeError(f"{src}: stage(s) {missing} have not finished; run (b) first")
    shutil.rmtree(dst / ".stages.tmp", ignore_errors=True)  # an earlier, interrupted copy
    for st in SHARED_STAGES[variant]:  # hard links: a finished stage's files are only read from now on
        shutil.copytree(src / "stages" / st, dst / ".stages.tmp" / st, copy_function=_link_or_copy)
    (dst / ".stages.tmp").rename(dst / "stages")  # all stages or none: a half copy is never taken as finished


@torch.no_grad()
def prompt_probe(run: Path, batches: int, before_pretrain: bool = True) -> dict[str, float]:
    """Masked-LM loss and accuracy on validation rows, with the same masks: the packaged PLM as loaded (its MLM
    head's transform untrained) and after the warm-up, both without prompts (what the warm-up did; skipped
    without ``before_pretrain``, for a run that shares another's warm-up); then the run's pre-trained weights
    with no prompts, with prompts from the pre-trained CTR model and with prompts from a randomly initialised
    CTR model (whether the prompts carry the row's ID view)."""
    from recsys.data.loader import ParquetBatches, embedding_lookup
    from recsys.data.schema import PreparedSchema
    from recsys.experiment import build_task, load_config
    from recsys.methods.clickprompt import PRETRAIN
    from recsys.train.checkpoint import load_part

    cfg = load_config(run / "config.yaml")
    schema = PreparedSchema.load(cfg.data.path)
    torch.manual_seed(12345)
    # built in this order whatever is probed, so that the random CTR model's weights do not depend on it
    packaged = build_task(schema, cfg, device=torch.device("cpu"))  # the PLM as loaded, before any stage
    warmed = build_task(schema, cfg, device=torch.device("cpu"))
    task = build_task(schema, cfg, device=torch.device("cpu"))
    load_part(run / "stages" / "pretrain" / "checkpoints" / "best", task)
    random_ctr = build_task(schema, cfg, device=torch.device("cpu")).model  # fresh CTR weights, same shapes
    probes = {}
    if before_pretrain:
        load_part(run / "stages" / "warmup" / "checkpoints" / "best", warmed)
        probes = {"packaged PLM, before the warm-up": (packaged, lambda b: None),
                  "after the warm-up": (warmed, lambda b: None)}
    probes |= {"no prompts": (task, lambda b: None),
               "pre-trained CTR model": (task, lambda b: task.model(b).representation),
               "random CTR model": (task, lambda b: random_ctr(b).representation)}
    for t, _ in probes.values():
        t.eval()
        t.set_stage(PRETRAIN)
    random_ctr.eval()
    loader = ParquetBatches(cfg.data.path, "valid", schema, 64, side_files=task.side_files("valid"),
                            lookup=embedding_lookup(cfg.data.path, schema, cfg.data.min_count))
    sums = {k: [0.0, 0.0, 0.0] for k in probes}
    for name, (t, rep_of) in probes.items():
        t.plm.reset_eval_masks()
        for _, batch in zip(range(batches), loader, strict=False):
            loss_sum, tokens, correct = t.plm("mlm", rep_of(batch), batch.extras["input_ids"],
                                              batch.extras["length"], batch.weights)
            sums[name][0] += float(loss_sum)
            sums[name][1] += float(tokens)
            sums[name][2] += float(correct)
    return {k: {"mlm_loss": v[0] / v[1], "mlm_accuracy": v[2] / v[1], "tokens": int(v[1])} for k, v in sums.items()}


@torch.no_grad()
def serving_cost(base_run: Path, b_run: Path, rounds: int) -> dict[str, dict[str, float]]:
    """Median scoring latency (``task.score``: the served logit, unsharded, eval mode) of the base, (b) and
    (a) at batches of 1 and 4,096 test rows, the models timed in turn in each round (``interleaved_medians``).
    Weights do not change the cost, so the models are built from the runs' configs without loading them; (a)
    is (b)'s configuration with ``finetune=joint`` (no trained (a) run is needed)."""
    from recsys.data.loader import ParquetBatches, embedding_lookup
    from recsys.data.schema import PreparedSchema
    from recsys.experiment import build_task, load_config

    cfgs = {"base": load_config(base_run / "config.yaml"), "clickprompt_b": load_config(b_run / "config.yaml"),
            "clickprompt_a": load_config(b_run / "config.yaml", ["method.clickprompt.finetune=joint"])}
    data = cfgs["base"].data
    schema = PreparedSchema.load(data.path)
    tasks = {k: build_task(schema, c, device=torch.device("cpu")) for k, c in cfgs.items()}
    for task in tasks.values():
        task.eval()
    out = {}
    for rows in (1, 4096):
        batch = next(iter(ParquetBatches(data.path, "test", schema, rows,
                                         side_files=tasks["clickprompt_a"].side_files("test"),
                                         lookup=embedding_lookup(data.path, schema, data.min_count))))
        n = rounds if rows == 1 else max(3, rounds // 20)
        caps = {"clickprompt_a": 3} if rows > 1 else None  # the PLM's pass over 4,096 rows takes about a minute
        medians = interleaved_medians({k: lambda t=t, b=batch: t.score(b) for k, t in tasks.items()}, n, caps)
        out[str(rows)] = {k: {"latency_s": v, "rows_per_s": rows / v} for k, v in medians.items()}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["ml-100k", "ml-1m"], required=True)
    p.add_argument("--split", choices=["cold_item", "cold_user"], default=None)
    p.add_argument("--backbones", nargs="+", default=["deepfm", "dcnv2", "autoint"])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--joint-seeds", nargs="*", type=int, default=[1],
                   help="seeds of mode (a) (costly on CPU; none: only its serving cost is measured)")
    p.add_argument("--joint-backbones", nargs="*", default=["deepfm"])
    p.add_argument("--joint-start", choices=["pretrain", "b"], default="pretrain",
                   help="mode (a) from the PA-MLM weights (the paper; variant clickprompt_a) or from the seed's "
                        "finished (b) run (clickprompt_a_from_b; each of --joint-seeds must be in --seeds)")
    p.add_argument("--diagnose", nargs="*", choices=sorted(SHARED_STAGES), default=None,
                   help="also variants of (b) that find what in PA-MLM costs it AUC (each shares the seed's (b) "
                        "stages it would recompute); none named: clickprompt_b_fresh and "
                        "clickprompt_b_dense_pretrained")
    p.add_argument("--mlm-batch", type=int, default=64, help="rows per step in the language-model stages")
    p.add_argument("--warmup-steps", type=int, default=40, help="steps per warm-up epoch")
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--pretrain-steps", type=int, default=50, help="steps per PA-MLM epoch")
    p.add_argument("--pretrain-epochs", type=int, default=2)
    p.add_argument("--mlm-eval-steps", type=int, default=10, help="validation batches of the language-model stages")
    p.add_argument("--joint-steps", type=int, default=30, help="mode (a): steps per fine-tuning epoch")
    p.add_argument("--joint-epochs", type=int, default=2, help="mode (a): fine-tuning epochs (each one evaluates "
                   "the whole validation split through the PLM)")
    p.add_argument("--probe-batches", type=int, default=30)
    p.add_argument("--latency-rounds", type=int, default=100, help="serving rounds at batch 1 (4,096: a 20th)")
    p.add_argument("--record", default=None,
                   help="the record's name in benchmarks/results (default clickprompt_<data>; another keeps that one)")
    args = p.parse_args()
    if args.joint_start == "b" and not set(args.joint_seeds) <= set(args.seeds):
        p.error(f"--joint-start b: mode (a) starts from each seed's (b) run; --joint-seeds {args.joint_seeds} must "
                f"be among --seeds {args.seeds}")
    if args.diagnose == []:
        args.diagnose = ["clickprompt_b_fresh", "clickprompt_b_dense_pretrained"]
    data = data_name(args.dataset, args.split)
    prepare_data(args.dataset, args.split)
    tokens = REPO / "runs" / "features" / data / "row_tokens"
    if not (tokens / "meta.json").is_file() or len(json.loads((tokens / "meta.json").read_text())["splits"]) < 3:
        subprocess.run([python(), "-m", "embedding_jobs.row_tokens", "--dataset", f"runs/data/{data}", "--out",
                        str(tokens), "--no-progress"], cwd=REPO, check=True)
    todo = variants(tokens, args)
    results: dict[str, dict[str, list[dict]]] = {}
    probes: dict[str, dict] = {}
    for backbone in args.backbones:
        results[backbone] = {"base": [run_one(args.dataset, data, backbone, s, [], "base") for s in args.seeds]}
        results[backbone]["clickprompt_b"] = [run_one(args.dataset, data, backbone, s, todo["clickprompt_b"],
                                                      "clickprompt_b") for s in args.seeds]
        print(f"{backbone:<8} base {fmt([r['test_auc'] for r in results[backbone]['base']])}  (b) "
              f"{fmt([r['test_auc'] for r in results[backbone]['clickprompt_b']])}", flush=True)
        for v in args.diagnose or ():
            for s in args.seeds:
                share_stages(data, backbone, s, v)
            results[backbone][v] = [run_one(args.dataset, data, backbone, s, todo[v], v) for s in args.seeds]
        if backbone in args.joint_backbones and args.joint_seeds:
            joint = ["clickprompt_a"] if args.joint_start == "pretrain" else [
                "clickprompt_a_from_b", "clickprompt_b_continued", "clickprompt_a_frozen_ctr"]
            for v in joint:
                results[backbone][v] = [run_one(args.dataset, data, backbone, s, todo[v], v) for s in args.joint_seeds]
        run = REPO / "runs" / "bench" / run_name(data, backbone, args.seeds[0], "clickprompt_b")
        probes[backbone] = prompt_probe(run, args.probe_batches)
        for v in [v for v in args.diagnose or () if v in OWN_PRETRAIN]:  # part of the CTR model frozen in PA-MLM:
            # do the prompts still carry the ID view? (its warm-up is (b)'s, probed above)
            frozen = prompt_probe(run.with_name(run_name(data, backbone, args.seeds[0], v)), args.probe_batches,
                                  before_pretrain=False)
            probes[backbone] |= {f"{k}, {OWN_PRETRAIN[v]}": val for k, val in frozen.items()}
    cost_backbone, seed = args.backbones[0], args.seeds[0]
    cost = {"backbone": cost_backbone, "seed": seed, "batches": serving_cost(
        *(REPO / "runs" / "bench" / run_name(data, cost_backbone, seed, v) for v in ("base", "clickprompt_b")),
        args.latency_rounds)}
    report(args, data, results, probes, tokens, cost)
    return 0


def report(args: argparse.Namespace, data: str, results: dict, probes: dict, tokens: Path, cost: dict) -> None:
    meta = json.loads((tokens / "meta.json").read_text())
    summary = {"dataset": args.dataset, "data": data, "seeds": args.seeds, "joint_seeds": args.joint_seeds,
               "joint_start": args.joint_start,
               "command": "python -m benchmarks.clickprompt " + " ".join(sys.argv[1:]),
               "budget": {"mlm_batch": args.mlm_batch, "warmup_steps_per_epoch": args.warmup_steps,
                          "warmup_epochs": args.warmup_epochs, "pretrain_steps_per_epoch": args.pretrain_steps,
                          "pretrain_epochs": args.pretrain_epochs, "mlm_eval_batches": args.mlm_eval_steps,
                          "joint_steps_per_epoch": args.joint_steps, "joint_epochs": args.joint_epochs},
               "row_tokens": {k: meta[k] for k in ("tokenizer", "max_length", "splits")},
               "environment": environment(), "probes": probes, "serving_cost": cost,
               "runs": {b: {v: per_seed(runs) for v, runs in vs.items()} for b, vs in results.items()},
               "stages": {b: _stage_histories(data, b, args.seeds[0]) for b in results}}
    stem = RESULTS / (args.record or f"clickprompt_{data}")
    write_json(stem.with_suffix(".json"), summary)
    bud = summary["budget"]
    lines = [f"# ClickPrompt on {data}", "", f"Command: `{summary['command']}`. Seeds {args.seeds} (mode (a): "
             f"{args.joint_seeds or 'not trained; its serving cost only'}). The language model is the packaged all-MiniLM-L6-v2 as a masked LM (its MLM "
             "head's transform is untrained, so a plain-MLM warm-up comes first).", "",
             f"Budget on 2 cores: warm-up {bud['warmup_epochs']} × {bud['warmup_steps_per_epoch']} steps and PA-MLM "
             f"{bud['pretrain_epochs']} × {bud['pretrain_steps_per_epoch']} steps, of {bud['mlm_batch']} rows each "
             f"({bud['warmup_epochs'] * bud['warmup_steps_per_epoch'] * bud['mlm_batch']:,} and "
             f"{bud['pretrain_epochs'] * bud['pretrain_steps_per_epoch'] * bud['mlm_batch']:,} rows in all), validated "
             f"on {bud['mlm_eval_batches']} batches; mode (b) then fine-tunes the CTR model on the whole training "
             f"split, mode (a) for {bud['joint_epochs']} epochs of {bud['joint_steps_per_epoch']} batches of "
             f"{bud['mlm_batch']} rows, from "
             + ("the PA-MLM weights" if args.joint_start == "pretrain" else "the same seed's finished (b) run")
             + ". Every variant is selected and tested on the whole validation and test splits.", ""]
    for b, vs in summary["runs"].items():
        base = mean_std(vs["base"]["test_auc"])[0]
        lines += [f"## {b}", "", "| variant | seeds | test AUC | test logloss | AUC − base |", "|---|---|---|---|---|"]
        for v, r in vs.items():
            lines.append(f"| {v} | {len(r['test_auc'])} | {fmt(r['test_auc'])} | {fmt(r['test_logloss'])} | "
                         f"{mean_std(r['test_auc'])[0] - base:+.4f} |")
        lines += [line.replace("| backbone |", "| variant |") for line in regime_table(vs)]
        pr = probes[b]
        lines += ["", f"Prompt probe (seed {args.seeds[0]}'s pre-trained weights, {pr['no prompts']['tokens']:,} "
                  "masked validation tokens, the same masks in each row):", "",
                  "| prompts | MLM loss | MLM accuracy |", "|---|---|---|"]
        lines += [f"| {k} | {x['mlm_loss']:.4f} | {x['mlm_accuracy']:.4f} |" for k, x in pr.items()]
        st = summary["stages"][b]
        # after each epoch, in order (the value before the warm-up is the probe's first row)
        lines += ["", f"Language-model stages (seed {args.seeds[0]}), validation after each epoch: " + "; ".join(
            f"{name}: MLM loss {_epochs(h, 'valid_mlm_loss')}, accuracy {_epochs(h, 'valid_mlm_accuracy')}"
            for name, h in st.items()), ""]
    if cost:
        lines += [f"## Serving cost ({cost['backbone']})", "", "`task.score` (the served logit), unsharded, eval mode, "
                  "one call of each model per round in turn, median. (b) is served without the language model.", "",
                  "| variant | batch 1 (ms) | batch 4,096 (ms) | rows/s at 4,096 | latency ÷ base at 1 / 4,096 |",
                  "|---|---|---|---|---|"]
        one, big = cost["batches"]["1"], cost["batches"]["4096"]
        for v in one:
            lines.append(f"| {v} | {one[v]['latency_s'] * 1e3:.2f} | {big[v]['latency_s'] * 1e3:.1f} | "
                         f"{big[v]['rows_per_s']:,.0f} | {one[v]['latency_s'] / one['base']['latency_s']:.3f} / "
                         f"{big[v]['latency_s'] / big['base']['latency_s']:.3f} |")
        lines.append("")
    env = summary["environment"]
    lines += ["Variants: `base` the backbone alone (also the control: the same CTR model without PA-MLM); "
              "`clickprompt_b` warm-up, PA-MLM with prefix prompts, then the CTR model alone (served without the "
              "language model); `clickprompt_b_fresh` (b) fine-tuned from zeroed embedding-optimizer state (Adagrad's sums "
              "of PA-MLM not carried; the same warm-up and PA-MLM stages as (b)); `clickprompt_b_dense_pretrained` (b) "
              "whose PA-MLM leaves the embedding tables as initialised (their learning rate 0 there), so the "
              "prompts shape only the CTR model's dense layers; `clickprompt_b_tables_pretrained` (b) whose PA-MLM "
              "leaves the CTR model's dense layers as initialised (their learning rate 0 there), so (b) fine-tunes "
              "from PA-MLM's tables alone; `clickprompt_b_nothing_pretrained` their control: tables and dense layers at rate "
              "0 in PA-MLM and fine-tuned from zeroed Adagrad state (the base through (b)'s pipeline, from another "
              "random start); `clickprompt_a` the same pre-training, then CTR model and language model together; "
              "`clickprompt_a_from_b` CTR model and language model together from the (b) run of the same seed "
              "(its CTR model, PLM and prompts), the PLM's scoring head starting at zero; `clickprompt_b_continued` "
              "its control: the (b) run's CTR model trained on as many rows in as small batches, without the PLM; "
              "`clickprompt_a_frozen_ctr` the joint start from (b) with the CTR model frozen (only the PLM, prompts "
              "and scoring head learn; its control is (b)).",
              "", environment_line(env), ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print(f"wrote {stem}.md/.json")


def _epochs(history: list[dict], key: str) -> str:
    return " -> ".join(f"{h[key]:.3f}" for h in history)


def _stage_histories(data: str, backbone: str, seed: int) -> dict[str, list[dict]]:
    run = REPO / "runs" / "bench" / run_name(data, backbone, seed, "clickprompt_b")
    out = {}
    for stage in ("warmup", "pretrain"):
        path = run / "stages" / stage / "metrics.json"
        if path.is_file():
            out[stage] = json.loads(path.read_text())["history"]
    return out


if __name__ == "__main__":
    sys.exit(main())
