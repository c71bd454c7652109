"""Run the whole pipeline through TorchX, one component after another.

    python -m launch.pipeline                                    # this machine (local_cwd), ML-100K
    python -m launch.pipeline --scheduler kubernetes --dryrun --image REPO/llmctr:0.1 --root /mnt/llmctr

Steps: prepare the dataset; fine-tune the language model on field/feature pairs (LLaCTR, within a time
budget) and embed the fields with it; adapt the language model to the CTR task (ELEC, within a time
budget) and embed the users and items with it (``--replicas`` processes each); train the base model; train
the same backbone with LLaCTR's field knowledge; train ELEC's gain network on the adapted vectors; distil it
into the tabular-only student; export the student and score the test split with the export alone; train
SRP4CTR (sequence pre-training, then fine-tuning), cache its encoder's output of every history, export the
model that reads that cache and score with it; tokenise every row once and train ClickPrompt (a masked-LM
warm-up and prompt-augmented MLM on a row budget, then the CTR model alone), export it and score with the
export; print everything side by side. Each step is a TorchX AppDef (``launch/components.py``); a step that fails stops the
pipeline with its logs' location. Steps are idempotent: a rerun skips finished embedding parts and resumes
training from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from torchx import specs
from torchx.runner import get_runner

from launch import components
from recsys.train.config import override

Step = tuple[str, Callable[[], specs.AppDef | None]]


def trained_runs(args: argparse.Namespace) -> list[str]:
    """The run folders the pipeline's training steps write, in order: the final table lists them all."""
    name = run_name(args)
    return [f"{name}_{variant}" for variant in ("base", "llactr", "elec_gain", "elec_student", "srp4ctr", "clickprompt")]


def steps(args: argparse.Namespace) -> list[Step]:
    """The pipeline's steps; each AppDef is built just before it runs, once its inputs exist. A step whose
    output is already complete builds None and is skipped (a fine-tuned model is not trained again: its
    feature tables were made with exactly those weights)."""
    root = Path(args.root)
    data, runs = root / "data" / args.dataset, root / "runs"
    features = root / "features" / (args.dataset if args.llm == "minilm" else f"{args.dataset}-{args.llm}")
    common = [f"data.path={data}", f"train.out_dir={runs}", f"model.backbone={args.backbone}"]
    local = args.scheduler == "local_cwd"
    image = {} if local else {"image": args.image}
    train = components.train_local if local else components.train_cluster
    size = {"j": f"1x{args.nproc}"} if local else {"j": args.j, **image}
    base, llactr, gain, student, srp, click = trained_runs(args)
    out: list[Step] = [
        ("prepare", lambda: components.prepare(args.dataset, str(data), **image))]
    llm = {}  # the language model every LM step starts from: the packaged MiniLM unless --llm says otherwise
    tag = "" if args.llm == "minilm" else f"-{args.llm}"
    if args.llm != "minilm":
        llm_dir = root / "models" / args.llm
        llm = {"model": str(llm_dir)}
        out.append((f"materialize {args.llm}", lambda: components.materialize(args.llm, str(llm_dir), **image)))
    fields_model = root / "models" / f"{args.dataset}{tag}-fields"
    out.append(("fine-tune fields", lambda: None if (fields_model / "report.json").is_file() else
                components.finetune_fields(str(data), str(fields_model), time_budget_s=args.finetune_budget_s,
                                           **llm, **image)))
    out.append(("embed field", lambda: components.embed("field", str(data), str(features), model=str(fields_model),
                                                        engine=args.engine, **image)))
    elec_model = root / "models" / f"{args.dataset}{tag}-elec"
    out.append(("adapt LM (ELEC)", lambda: None if (elec_model / "report.json").is_file() else
                components.adapt_lm(str(data), str(elec_model), time_budget_s=args.adapt_budget_s, **llm, **image)))
    for entity in ("user", "item"):
        out.append((f"embed {entity}", lambda e=entity: components.embed(
            e, str(data), str(features), model=str(elec_model), engine=args.engine, replicas=args.replicas,
            **image)))
    out.append(("train base", lambda: train(args.config, *common, f"name={base}", **size)))
    out.append(("train llactr", lambda: train(args.config, *common, f"name={llactr}", "method.name=llactr",
                                              f"method.llactr.field_table={features / 'field'}", **size)))
    out.append(("train ELEC gain", lambda: train(
        args.config, *common, f"name={gain}", "method.name=elec_gain",
        f"method.elec.user_table={features / 'user'}", f"method.elec.item_table={features / 'item'}", **size)))
    distill = components.distill_local if local else components.distill_cluster
    out.append(("distill ELEC student", lambda: distill(
        args.config, str(runs / gain), *common, f"name={student}", *args.distill, **size)))
    export_dir = root / "export" / student
    out.append(("export student", lambda: components.export(str(runs / student), str(export_dir), **image)))
    out.append(("evaluate exported student", lambda: components.evaluate(
        str(export_dir), str(data / "test.parquet"), str(root / "scores" / f"{student}_test.parquet"),
        metrics=str(export_dir / "test_metrics.json"), **image)))
    # SRP4CTR: pre-train the sequence encoder and fine-tune (one run, two stages), cache the encoder's output of
    # every history, serve the backbone, cross-attention and Q-Former from that cache
    cache, srp_export = features / f"{srp}_history", root / "export" / srp
    out.append(("train SRP4CTR", lambda: train(args.config, *common, f"name={srp}", "method.name=srp4ctr", **size)))
    out.append(("encode histories", lambda: components.encode_histories(str(runs / srp), str(cache), **image)))
    out.append(("export SRP4CTR", lambda: components.export(str(runs / srp), str(srp_export),
                                                           history_cache=str(cache), **image)))
    out.append(("evaluate exported SRP4CTR", lambda: components.evaluate(
        str(srp_export), str(data / "test.parquet"), str(root / "scores" / f"{srp}_test.parquet"),
        metrics=str(srp_export / "test_metrics.json"), **image)))
    # ClickPrompt (b): plain-MLM warm-up and PA-MLM on a row budget (the PLM is always the packaged MiniLM: it
    # needs a masked LM), then the CTR model alone, exported and served without any language model
    tokens, click_export = root / "features" / args.dataset / "row_tokens", root / "export" / click
    lm_stages = ("warmup", "pretrain")
    out.append(("tokenise rows", lambda: components.row_tokens(str(data), str(tokens), **image)))
    out.append(("train ClickPrompt", lambda: train(
        args.config, *common, f"name={click}", "method.name=clickprompt", f"method.clickprompt.tokens={tokens}",
        *(override(f"train.{key}", dict.fromkeys(lm_stages, n)) for key, n in (
            ("stage_steps", args.clickprompt_steps), ("stage_batch_size", 32), ("stage_epochs", 1),
            ("stage_eval_steps", 5))), **size)))
    out.append(("export ClickPrompt", lambda: components.export(str(runs / click), str(click_export), **image)))
    out.append(("evaluate exported ClickPrompt", lambda: components.evaluate(
        str(click_export), str(data / "test.parquet"), str(root / "scores" / f"{click}_test.parquet"),
        metrics=str(click_export / "test_metrics.json"), **image)))
    return out


def run_name(args: argparse.Namespace) -> str:
    return f"{args.dataset.replace('-', '')}_{args.backbone}" + ("" if args.llm == "minilm" else f"_{args.llm}")


def _auc(regimes: dict, name: str) -> str:
    r = regimes.get(name)
    return "-" if r is None or r["auc"] is None else f"{r['auc']:.4f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scheduler", default="local_cwd", help="local_cwd, kubernetes, slurm, ...")
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--backbone", default="deepfm")
    p.add_argument("--config", default="recsys/configs/ml100k_deepfm.yaml")
    p.add_argument("--root", default="runs/pipeline", help="folder for data, feature tables and runs")
    p.add_argument("--engine", default="vllm", choices=["vllm", "transformers"])
    p.add_argument("--llm", default="minilm", choices=["minilm", "smollm2"],
                   help="the language model of every LM step: the packaged MiniLM encoder (default), or the packaged "
                        "SmolLM2-135M-Instruct decoder, materialised first (far slower on CPU; see the README)")
    p.add_argument("--replicas", type=int, default=1, help="embedding processes per entity")
    p.add_argument("--finetune-budget-s", type=int, default=180, help="time budget of the field fine-tuning")
    p.add_argument("--adapt-budget-s", type=int, default=120, help="time budget of ELEC's language-model adaptation")
    p.add_argument("--clickprompt-steps", type=int, default=40,
                   help="ClickPrompt: steps of 32 rows in its warm-up and in its PA-MLM (MiniLM on CPU: ~2 s a step)")
    p.add_argument("--distill", nargs="*", default=["method.elec.score_weight=1", "method.elec.rep_weight=1"],
                   metavar="KEY=VALUE", help="the student's distillation settings")
    p.add_argument("--nproc", type=int, default=2, help="training ranks on this machine")
    p.add_argument("--j", default="2x8", help="training NODESxPROCS on a cluster")
    p.add_argument("--image", default="", help="container image (cluster schedulers)")
    p.add_argument("--dryrun", action="store_true", help="print each step's scheduler request, run nothing")
    args = p.parse_args(argv)
    if args.scheduler != "local_cwd" and not args.image:
        p.error("--image is required for a cluster scheduler")
    runner = get_runner()
    cfg = {"log_dir": str(Path(args.root) / "torchx")} if args.scheduler == "local_cwd" else {}
    for title, build in steps(args):
        if args.dryrun:
            try:
                app = build()
            except ValueError as e:  # a later step's inputs do not exist before the earlier steps ran
                print(f"=== {title} === (not built in a dry run: {e})")
                continue
            if app is None:
                print(f"=== {title} === (already done, skipped)")
                continue
            print(f"=== {title} ===\n{runner.dryrun(app, args.scheduler, cfg=cfg)}")
            continue
        app = build()
        if app is None:
            print(f"=== {title} === (already done, skipped)", flush=True)
            continue
        print(f"=== {title} ===", flush=True)
        handle = runner.run(app, args.scheduler, cfg=cfg)
        for line in runner.log_lines(handle, app.roles[0].name, k=0, should_tail=True):
            print(line, end="" if line.endswith("\n") else "\n", flush=True)
        status = runner.wait(handle, wait_interval=1)
        if status is None or status.state != specs.AppState.SUCCEEDED:
            print(f"step '{title}' failed ({status.state if status else 'unknown'}); logs: {handle}",
                  file=sys.stderr)
            return 1
    if not args.dryrun:
        runs = Path(args.root) / "runs"
        prefix = run_name(args) + "_"
        print(f"\n{'model':<22} {'valid AUC':>9} {'test AUC':>9} {'logloss':>8} {'warm AUC':>9} "
              f"{'cold-user AUC':>13}")
        for run in trained_runs(args):
            r = json.loads((runs / run / "test_metrics.json").read_text())
            regimes = r.get("test_regimes", {})
            print(f"{args.backbone + ' ' + run.removeprefix(prefix):<22} {r['valid_auc']:>9.4f} {r['test_auc']:>9.4f} "
                  f"{r['test_logloss']:>8.4f} {_auc(regimes, 'warm'):>9} {_auc(regimes, 'cold_user'):>13}")
        if regimes:
            print(f"(test rows: {regimes['warm']['rows']:,} warm, {regimes['cold_user']['rows']:,} of cold users, "
                  f"of {regimes['all']['rows']:,}; per-regime tables in each run's log and test_metrics.json)")
        exports = Path(args.root) / "export"
        for run, what in ((trained_runs(args)[3], "student alone (recsys only, no language model)"),
                          (trained_runs(args)[4], "SRP4CTR model, from cached history encodings (no encoder)"),
                          (trained_runs(args)[5], "ClickPrompt CTR model (no language model)")):
            served = json.loads((exports / run / "test_metrics.json").read_text())
            print(f"the exported {what}: test AUC {served['auc']:.4f}, logloss {served['logloss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
