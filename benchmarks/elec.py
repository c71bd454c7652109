"""ELEC quality: base, gain network and distilled students, mean ± std over seeds, on real data.

    python -m benchmarks.elec --dataset ml-100k                      # DeepFM and DCNv2, seeds 1-5
    python -m benchmarks.elec --dataset ml-1m --split cold_item      # 10% of the items held out
    python -m benchmarks.elec --dataset ml-1m --adapt-budget-s 600
    python -m benchmarks.elec --dataset ml-100k --ablations          # injection point, projection init, untuned
                                                                     # LM, item vectors only, profile-only user
                                                                     # texts, joint mode
    python -m benchmarks.elec --dataset ml-1m --ablations elec_gain_logit elec_gain_std   # just these two
    python -m benchmarks.elec --dataset ml-1m --split cold_item --backbones deepfm --record elec_ml-1m_cold-item_unlabeled \
        --skip elec_student_alone elec_student_rep elec_student_both     # + distillation on unlabeled rows
    python -m benchmarks.elec --dataset ml-100k --backbones deepfm --llm minilm smollm2 --record elec_ml-100k_smollm2 \
        --skip elec_student_alone elec_student_rep elec_student_both elec_student_unlabeled control_student_unlabeled
                                                                     # MiniLM and the packaged decoder side by side

Steps, each skipped when its output exists (rerun to resume):

1. adapt each --llm to the CTR task (``embedding_jobs.ctr_adapt``) -> runs/models/<ds>-elec (the packaged
   MiniLM) or runs/models/<ds>-elec-smollm2 (the packaged SmolLM2 decoder, materialised once first);
2. embed users and items with it (``embedding_jobs.run``, vLLM engine) -> runs/features/<ds>-elec[-smollm2]/{user,item};
3. train, per backbone and seed (``benchmarks.quality``'s runs, config benchmarks/configs/<ds>.yaml):
   ``base``; ``elec_gain``; ``elec_student_{score,rep,both}`` from that seed's gain network (two-stage);
   ``elec_student_alone`` (no distillation: must equal the base exactly); ``control_student_score`` (score
   distillation from the base model of the same seed: what distillation does without any language model);
   ``elec_student_unlabeled`` and ``control_student_unlabeled``: the same two, distilling on the valid split's
   rows as well (labels unused), so that ids without training rows get student rows of their own.
   A language model other than MiniLM names its variants with a suffix (``elec_gain_smollm2``, its students
   ``elec_student_score_smollm2``...); ``base`` and the controls have no language model and are shared.
   The ablations ``elec_gain_random<suffix>`` and ``elec_gain_logit_random<suffix>`` are the gain network's
   control: that model's user and item tables with each vector's direction redrawn at random (its norm kept;
   ``benchmarks.random_field_table``), so what they gain is not the language model's.

The table goes to benchmarks/results/elec_<data>.{md,json,png} (<data>: the dataset and its split, as in
``benchmarks.quality``): test AUC and logloss, the gain over the base, the share of the gain network's
improvement that each student keeps, and test AUC per regime; the record keeps every figure per seed, so
``python -m benchmarks.compare --record elec_<data> ...`` pairs the variants with the base or a control.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import REPO, RESULTS, environment, environment_line, fmt, mean_std, python, write_json
from benchmarks.quality import (
    REGIMES,
    SEEDS,
    data_name,
    per_seed,
    prepare_data,
    regime_table,
    run_name,
    run_one,
)

LLMS = {"minilm": "", "smollm2": "_smollm2"}  # the variant-name suffix of each language model
CONTROL = ["method.name=elec_student", "method.elec.teacher_run=runs/bench/{tag}_{backbone}_s{seed}"]
UNLABELED = "data.unlabeled_splits=[valid]"
ITEMS_TEACHER = "method.elec.teacher_run=runs/bench/{tag}_{backbone}_elec_gain_items_s{seed}"
PROFILE_TEACHER = "method.elec.teacher_run=runs/bench/{tag}_{backbone}_elec_gain_profile_s{seed}"
# the distillation terms' weights of each student kind
TERMS = {"score": ["method.elec.score_weight=1", "method.elec.rep_weight=0"],
         "rep": ["method.elec.score_weight=0", "method.elec.rep_weight=1"],
         "both": ["method.elec.score_weight=1", "method.elec.rep_weight=1"],
         "alone": ["method.elec.score_weight=0", "method.elec.rep_weight=0"]}


# what each row of the report is
VARIANT_NOTES = {
    "base": "the backbone alone, BCE",
    "elec_gain": "gain network: the backbone plus the adapted user and item vectors as two extra fields",
    "elec_student_score": "student (tabular input only), BCE + score distillation from elec_gain",
    "elec_student_rep": "student, BCE + representation distillation from elec_gain",
    "elec_student_both": "student, BCE + both distillation terms",
    "elec_student_alone": "student with both distillation weights 0: must equal the base",
    "control_student_score": "score distillation from the base model of the same seed: distillation without a language model",
    "elec_student_unlabeled": "elec_student_score that also distils on the valid split's rows, labels unused "
                              "(data.unlabeled_splits=[valid]): the ids they hold, cold ones too, get their own rows",
    "control_student_unlabeled": "control_student_score on the same unlabeled rows: what they give without a "
                                 "language model",
    "elec_gain_logit": "gain network with late fusion (an MLP over the vectors added to the logit; the default injection)",
    "elec_gain_std": "gain network whose projections start at the id embeddings' scale (projection_std=0.02)",
    "elec_gain_untuned": "gain network on the packaged MiniLM's vectors, not adapted",
    "elec_gain_items": "gain network with the item vectors only",
    "elec_items_student_score": "student of elec_gain_items, score term",
    "elec_items_student_rep": "student of elec_gain_items, representation term",
    "elec_items_student_both": "student of elec_gain_items, both terms",
    "elec_gain_profile": "gain network on a model adapted with profile-only user texts (no history: no training row in them)",
    "elec_profile_student_score": "student of elec_gain_profile, score term",
    "elec_profile_student_both": "student of elec_gain_profile, both terms",
    "elec_joint_both": "joint mode: gain network and student trained together, both terms",
}


def gain_overrides(tables: Path, inject: str = "fields") -> list[str]:
    # the design's injection, stated explicitly: the default became "logit" after this benchmark's ablation
    return ["method.name=elec_gain", f"method.elec.user_table={tables / 'user'}",
            f"method.elec.item_table={tables / 'item'}", f"method.elec.inject={inject}"]


def variants(tables: Path, suffix: str = "") -> dict[str, list[str]]:
    """The runs of one language model's tables; ``suffix`` names its gain network and students."""
    student = ["method.name=elec_student",
               f"method.elec.teacher_run=runs/bench/{{tag}}_{{backbone}}_elec_gain{suffix}_s{{seed}}"]
    return {
        "base": [],
        f"elec_gain{suffix}": gain_overrides(tables),
        **{f"elec_student_{k}{suffix}": [*student, *TERMS[k]] for k in ("score", "rep", "both")},
        "elec_student_alone": ["method.name=elec_student", *TERMS["alone"]],
        # the control: the same score distillation from the base model of the same seed, no language model
        "control_student_score": [*CONTROL, *TERMS["score"]],
        # both also distil on the valid split's rows, labels unused: their cold ids get rows of their own
        f"elec_student_unlabeled{suffix}": [*student, *TERMS["score"], UNLABELED],
        "control_student_unlabeled": [*CONTROL, *TERMS["score"], UNLABELED],
    }


def llm_of(variant: str) -> str:
    """The language model whose vectors a variant's runs read (MiniLM's variants carry no suffix)."""
    return next((llm for llm, suffix in LLMS.items() if suffix and variant.endswith(suffix)), "minilm")


def gain_of(variant: str) -> str:
    """The gain network a variant's gain is measured against: the one of its language model."""
    return "elec_gain" + LLMS[llm_of(variant)]


def note(variant: str) -> str:
    llm = llm_of(variant)
    if llm == "minilm":
        return VARIANT_NOTES.get(variant, "")
    return VARIANT_NOTES.get(variant.removesuffix(LLMS[llm]), "") + f" ({llm} adapted instead of MiniLM)"


def ablations(tables: Path, untuned: Path, profile: Path) -> dict[str, list[str]]:
    gain = gain_overrides(tables)
    return {
        "elec_gain_logit": gain_overrides(tables, "logit"),  # late fusion instead of extra fields
        # projections that start at the id embeddings' scale, not PyTorch's default (~30x larger)
        "elec_gain_std": [*gain, "method.elec.projection_std=0.02"],
        "elec_gain_untuned": gain_overrides(untuned),  # the packaged MiniLM as is
        "elec_gain_items": ["method.name=elec_gain", f"method.elec.item_table={tables / 'item'}",
                            "method.elec.inject=fields"],  # no user side
        # students of the item-only gain network (user texts built from training rows shift between training
        # and test; catalogue texts do not)
        **{f"elec_items_student_{k}": ["method.name=elec_student", ITEMS_TEACHER, *TERMS[k]]
           for k in ("score", "rep", "both")},
        # user texts from the profile only (a model adapted on such texts): no user vector depends on a
        # training row, so nothing shifts between training and test rows
        "elec_gain_profile": gain_overrides(profile),
        **{f"elec_profile_student_{k}": ["method.name=elec_student", PROFILE_TEACHER, *TERMS[k]]
           for k in ("score", "both")},
        "elec_joint_both": ["method.name=elec_student", "method.elec.mode=joint", *gain[1:], *TERMS["both"]],
    }


def _done(ds: str, backbone: str, seed: int, variant: str) -> bool:
    return (REPO / "runs" / "bench" / run_name(ds, backbone, seed, variant) / "test_metrics.json").is_file()


def step(cmd: list[str], done: Path, log: Path) -> None:
    if done.exists():
        print(f"skip (exists): {done}", flush=True)
        return
    print("run:", " ".join(cmd), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        if subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed; see {log}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["ml-100k", "ml-1m"], required=True)
    p.add_argument("--split", choices=["cold_item", "cold_user"], default=None,
                   help="prepare with this split instead of the dataset's own")
    p.add_argument("--backbones", nargs="+", default=["deepfm", "dcnv2"])
    p.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    p.add_argument("--adapt-budget-s", type=int, default=300, help="time budget of the language-model adaptation")
    p.add_argument("--adapt-rows", type=int, default=20000)
    p.add_argument("--engine", default="vllm", choices=["vllm", "transformers"])
    p.add_argument("--llm", nargs="+", default=["minilm"], choices=list(LLMS),
                   help="the language models to adapt, each with its own gain network and students: minilm (packaged "
                        "encoder), smollm2 (the packaged decoder, materialised once into runs/models/smollm2)")
    p.add_argument("--ablations", nargs="*", default=None, metavar="VARIANT",
                   help="also these ablations (none named: all): injection at the logit, small projection init, item "
                        "vectors only, the untuned MiniLM's vectors, profile-only user texts, joint training")
    p.add_argument("--skip", nargs="*", default=[], metavar="VARIANT",
                   help="variants not to train (e.g. elec_student_alone, which equals the base by construction)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rewrite the report from the finished runs (variants with missing runs are left out)")
    p.add_argument("--ablation-backbones", nargs="+", default=["deepfm"], help="the backbones the ablations run on")
    p.add_argument("--record", default=None,
                   help="the record's name in benchmarks/results (default elec_<data>; another keeps that one)")
    args = p.parse_args()
    ds = data_name(args.dataset, args.split)
    args.data = ds
    data = REPO / "runs" / "data" / ds
    names = {llm: f"{ds}-elec{LLMS[llm].replace('_', '-')}" for llm in args.llm}  # <ds>-elec[-smollm2]
    models = {llm: REPO / "runs" / "models" / names[llm] for llm in args.llm}
    features = {llm: REPO / "runs" / "features" / names[llm] for llm in args.llm}
    tables, untuned = REPO / "runs" / "features" / f"{ds}-elec", REPO / "runs" / "features" / f"{ds}-untuned"
    profile_model, profile = REPO / "runs" / "models" / f"{ds}-elec-profile", REPO / "runs" / "features" / f"{ds}-elec-profile"
    logs = REPO / "runs" / "bench" / "logs"
    chosen = ablations(tables, untuned, profile)
    for llm in (llm for llm in args.llm if LLMS[llm]):  # late fusion on each other model's vectors as well
        chosen[f"elec_gain_logit{LLMS[llm]}"] = gain_overrides(features[llm], "logit")
    controls = {llm: features[llm].with_name(f"{features[llm].name}-random") for llm in args.llm}
    for llm in args.llm:  # the gain network's control: each model's tables, their directions random
        chosen[f"elec_gain_random{LLMS[llm]}"] = gain_overrides(controls[llm])
        chosen[f"elec_gain_logit_random{LLMS[llm]}"] = gain_overrides(controls[llm], "logit")
    if args.ablations:  # named ones only
        unknown = set(args.ablations) - set(chosen)
        if unknown:
            p.error(f"unknown ablations {sorted(unknown)}; choose from {sorted(chosen)}")
        chosen = {k: v for k, v in chosen.items() if k in args.ablations}
    prepare_data(args.dataset, args.split)
    todo, extra = {}, {}
    for llm in args.llm:
        model, name, base_model = models[llm], f"{ds}{LLMS[llm]}", []
        if llm != "minilm":
            folder = REPO / "runs" / "models" / llm
            step([python(), "-m", "embedding_jobs.materialize", "--model", llm, "--out", str(folder)],
                 folder / "materialized.json", logs / f"materialize_{llm}.log")
            base_model = ["--model", str(folder)]
        step([python(), "-m", "embedding_jobs.ctr_adapt", "--dataset", str(data), "--out", str(model), *base_model,
              "--time-budget-s", str(args.adapt_budget_s), "--rows", str(args.adapt_rows), "--no-progress"],
             model / "report.json", logs / f"adapt_{name}.log")
        step([python(), "-m", "embedding_jobs.run", "--entity", "user", "item", "--dataset", str(data), "--out",
              str(features[llm]), "--model", str(model), "--engine", args.engine, "--no-progress"],
             features[llm] / "item" / "table.parquet", logs / f"embed_{name}.log")
        todo.update(variants(features[llm], LLMS[llm]))
    needs = " ".join(" ".join(v) for v in chosen.values())
    for llm in (llm for llm in args.llm if args.ablations is not None and str(controls[llm]) in needs):
        for entity in ("user", "item"):
            step([python(), "-m", "benchmarks.random_field_table", "--like", str(features[llm] / entity), "--out",
                  str(controls[llm])], controls[llm] / entity / "table.parquet",
                 logs / f"random_{names[llm]}_{entity}.log")
    if args.ablations is not None and str(untuned) in needs:
        step([python(), "-m", "embedding_jobs.run", "--entity", "user", "item", "--dataset", str(data), "--out",
              str(untuned), "--engine", args.engine, "--no-history-outcomes", "--no-progress"],
             untuned / "item" / "table.parquet",
             logs / f"embed_{ds}_untuned.log")
    if args.ablations is not None and str(profile) in needs:
        # profile-only user texts (--history-length 0); head only: stage B was dropped or nearly flat before
        step([python(), "-m", "embedding_jobs.ctr_adapt", "--dataset", str(data), "--out", str(profile_model),
              "--history-length", "0", "--tune", "head", "--rows", str(args.adapt_rows), "--no-progress"],
             profile_model / "report.json", logs / f"adapt_{ds}_profile.log")
        step([python(), "-m", "embedding_jobs.run", "--entity", "user", "item", "--dataset", str(data), "--out",
              str(profile), "--model", str(profile_model), "--engine", args.engine, "--no-progress"],
             profile / "item" / "table.parquet", logs / f"embed_{ds}_profile.log")
    if args.ablations is not None:
        extra = chosen

    results: dict[str, dict[str, list[dict]]] = {}
    for backbone in args.backbones:
        results[backbone] = {}
        for variant, overrides in {**todo, **(extra if backbone in args.ablation_backbones else {})}.items():
            if variant in args.skip or args.report_only and not all(_done(ds, backbone, s, variant) for s in args.seeds):
                continue
            runs = [run_one(args.dataset, ds, backbone, s, overrides, variant) for s in args.seeds]
            results[backbone][variant] = runs
            print(f"{backbone:<7} {variant:<20} test AUC {fmt([r['test_auc'] for r in runs])}", flush=True)
    report(args, results, models)
    return 0


def report(args: argparse.Namespace, results: dict, models: dict[str, Path]) -> None:
    adapts = {llm: json.loads((m / "report.json").read_text()) for llm, m in models.items()}
    keys = ("valid_auc_before", "valid_auc_head", "valid_auc_after", "rows_used", "steps", "seconds", "kept", "options")
    summary = {"dataset": args.dataset, "data": args.data, "seeds": args.seeds,
               "command": "python -m benchmarks.elec "  # the command that trains these runs
               + " ".join(a for a in sys.argv[1:] if a != "--report-only"), "config": f"benchmarks/configs/{args.dataset.replace('-', '')}.yaml",
               # the first language model's, under the key the records have always had; every one's below
               "adaptation": {k: next(iter(adapts.values())).get(k) for k in keys},
               "adaptations": {llm: {k: a.get(k) for k in keys} for llm, a in adapts.items()},
               "environment": environment(), "runs": {
                   b: {v: per_seed(runs) for v, runs in vs.items()} for b, vs in results.items()}}
    stem = RESULTS / (args.record or f"elec_{args.data}")
    write_json(stem.with_suffix(".json"), summary)
    lines = [f"# ELEC on {args.data}", "",
             f"Command: `{summary['command']}` (config `{summary['config']}`), seeds {args.seeds}. Each row is "
             "mean ± std over the seeds; a student of seed s distils the gain network of seed s.", ""]
    for llm, a in summary["adaptations"].items():
        lines += [f"Language-model adaptation (packaged {llm}, two towers): validation AUC of the language model alone "
                  f"{_f(a['valid_auc_before'])} with an untrained head, {_f(a['valid_auc_head'])} after the head warm "
                  f"start on {a['rows_used']} rows; " + (
                      f"{_f(a['valid_auc_after'])} after {a['steps']} LoRA steps" if a.get("kept") != "head" else
                      f"{a['steps']} LoRA steps lowered it, so they were dropped and the base encoder kept")
                  + f" ({a['seconds']:.0f} s in all).", ""]
    for b, vs in summary["runs"].items():
        base = mean_std(vs["base"]["test_auc"])[0]
        lines += [f"## {b}", "", "| variant | test AUC | test logloss | AUC − base | share of the gain kept | best epochs |",
                  "|---|---|---|---|---|---|"]
        for v, r in vs.items():
            delta = mean_std(r["test_auc"])[0] - base
            gain = mean_std(vs[gain_of(v)]["test_auc"])[0] - base if gain_of(v) in vs else float("nan")
            kept = f"{delta / gain:.0%}" if v.startswith("elec_student") and gain > 0 else ""
            lines.append(f"| {v} | {fmt(r['test_auc'])} | {fmt(r['test_logloss'])} | {delta:+.4f} | {kept} | "
                         f"{r['best_epoch']} |")
        lines += [line.replace("| backbone |", "| variant |") for line in regime_table(vs)]
        lines += share_table(vs)
        alone = vs.get("elec_student_alone")
        if alone:
            same = alone["test_auc"] == vs["base"]["test_auc"]
            lines += ["", f"The student trained alone {'equals' if same else 'DIFFERS FROM'} the base in every seed "
                      "(same initialisation, same batches, BCE only)."]
        lines.append("")
    shown = dict.fromkeys(v for vs in summary["runs"].values() for v in vs)
    lines += ["Variants:", ""] + [f"- `{v}`: {note(v)}" for v in shown] + [""]
    env = summary["environment"]
    lines += [environment_line(env), ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    plot(summary, stem.with_suffix(".png"))
    print(f"wrote {stem}.md/.json/.png")


def share_table(vs: dict) -> list[str]:
    """Per gain network and regime where it beats the base, the share of that gain each student keeps (mean
    test AUCs over the seeds); the controls are measured against MiniLM's gain network."""
    def auc(v: str, regime: str) -> float | None:
        values = vs[v].get("regimes", {}).get(regime, {}).get("auc", [])
        return mean_std(values)[0] if values and None not in values else None

    lines: list[str] = []
    for gain in [v for v in vs if v == gain_of(v)] if "base" in vs else []:
        regimes = [r for r in REGIMES if r != "all" and auc("base", r) is not None
                   and auc(gain, r) is not None and auc(gain, r) > auc("base", r)]
        students = [v for v in vs if "student" in v and gain_of(v) == gain]
        if not regimes or not students:
            continue
        lines += ["", f"Share of {gain}'s gain over the base that each student keeps, per regime where there is "
                  f"one (student − base) / ({gain} − base):", "",
                  "| variant | " + " | ".join(r.replace("_", " ") for r in regimes) + " |",
                  "|---|" + "---|" * len(regimes)]
        for v in students:
            cells = [f"{(auc(v, r) - auc('base', r)) / (auc(gain, r) - auc('base', r)):.0%}" for r in regimes]
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = list(summary["runs"])
    fig, axes = plt.subplots(1, len(backbones), figsize=(5.5 * len(backbones), 3.8), squeeze=False)
    for ax, b in zip(axes[0], backbones, strict=True):
        vs = summary["runs"][b]
        names = list(vs)
        means = [mean_std(vs[v]["test_auc"])[0] for v in names]
        stds = [mean_std(vs[v]["test_auc"])[1] for v in names]
        colors = ["#999999" if v == "base" else "#dd8452" if "gain" in v else "#4c72b0" for v in names]
        ax.barh(names, means, xerr=stds, color=colors, capsize=3)
        ax.axvline(means[0], color="#555555", lw=0.8, ls="--")
        ax.set_xlim(min(means) - 0.01, max(means) + 0.005)
        ax.invert_yaxis()
        ax.set(title=f"{b} on {summary['data']} (test AUC, {len(summary['seeds'])} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
