"""Industrial scale on synthetic click logs: large sharded tables, and what training costs as the work grows.

    python -m benchmarks.scale                        # everything: about 30 minutes on 2 cores
    python -m benchmarks.scale --parts ranks,capacity # only some parts (the record keeps the others' last figures)

The data are ``recsys.data.synthetic`` click logs (Zipf ids, labels from a hidden model), written into the
prepared format once under ``runs/data/scale/`` and reused. The model is ``benchmarks/configs/synthetic.yaml``
(DeepFM, 16-d, row-wise Adagrad fused into FBGEMM's backward, batch 4096). Parts:

- ``ranks``: the headline set (10M rows; 26 categorical fields with vocabularies from 10^7 down to 10^3, 33M
  embedding rows in all; 3 multi-valued; 13 dense) trained and tested by the real trainer through TorchX
  (``launch/components.py:train_local``) on 1 rank, and on 2 gloo ranks with a table-wise and a column-wise
  plan: the plans, each rank's embedding memory (weights and optimizer state of its shards), samples/s, and
  test AUC beside the hidden model's own (the best any model can reach).
- ``batch``, ``dim``, ``features``, ``tables``: one rank, one point per process (so its peak memory is the
  point's): build the trainer, warm up, then time one pass of about 262k training rows through
  ``Trainer.train_epoch`` (loading, KJT construction, lookup, fused backward, dense step). Batch size 512 to
  16384 on the headline set; embedding dimension 16 to 128 (26 fields, vocabularies 10^3 to 10^6); 4 to 32
  fields of 10^5 rows; 8 fields of 10^4 to 10^7 rows.
- ``capacity``: the largest single 16-d table the planner accepts on one rank of this machine (a binary
  search over meta-device tables, the planner given this machine's real memory: ``recsys.train.distributed.
  topology``), beside the largest that the sweeps trained.

Results: benchmarks/results/scale.{md,json,png}. On GPUs the code path is the same; see the record's last
section for the command.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, RESULTS, environment, environment_line, python, torchx_train, write_json

CONFIG = "benchmarks/configs/synthetic.yaml"
DATA = REPO / "runs" / "data" / "scale"
PARTS = ("ranks", "batch", "dim", "features", "tables", "capacity")
SWEEP_ROWS = 262_144
HEADLINE = {"rows": 10_000_000}
DATASETS = {  # name -> SyntheticSpec arguments
    "headline": HEADLINE,
    "vocab1e6": {"rows": 2_000_000, "max_vocab": 1_000_000},
    **{f"features{n}": {"rows": 1_000_000, "features": n, "multi": 0, "table_size": 100_000} for n in (4, 8, 16, 32)},
    **{f"table1e{e}": {"rows": 1_000_000, "features": 8, "multi": 0, "table_size": 10 ** e} for e in (4, 5, 6, 7)},
}
SWEEPS = {  # part -> (what varies, [(value, dataset, overrides)])
    "batch": ("batch size", [(b, "headline", [f"data.batch_size={b}"]) for b in (512, 1024, 2048, 4096, 8192, 16384)]),
    "dim": ("embedding dim", [(d, "vocab1e6", [f"model.embedding_dim={d}"]) for d in (16, 32, 64, 128)]),
    "features": ("categorical fields", [(n, f"features{n}", []) for n in (4, 8, 16, 32)]),
    "tables": ("rows per table", [(10 ** e, f"table1e{e}", []) for e in (4, 5, 6, 7)]),
}


def dataset(name: str) -> Path:
    """The named synthetic set, generated on first use (the same arguments give the same bytes)."""
    from recsys.data.schema import PreparedSchema
    from recsys.data.synthetic import SyntheticSpec, generate

    spec = SyntheticSpec(name=f"synthetic-{name}", **DATASETS[name])
    out = DATA / name
    if (out / "schema.json").is_file() and PreparedSchema.load(out).fingerprint == spec.fingerprint():
        return out
    print(f"generating {name}: {spec}", flush=True)
    generate(spec, out)
    return out


def embedding_rows(name: str) -> int:
    from recsys.data.schema import FIRST_ID
    from recsys.data.synthetic import SyntheticSpec

    return sum(v + FIRST_ID for v in SyntheticSpec(**DATASETS[name]).vocab_sizes())


def worker(spec: dict) -> dict:
    """One sweep point, in its own process: build the trainer, warm up, time one pass of training rows."""
    from recsys.experiment import build_trainer, load_config
    from recsys.train.trainer import RunState

    out = tempfile.mkdtemp(prefix="bench-scale-")
    try:
        cfg = load_config(CONFIG, [f"data.path={spec['data']}", f"train.out_dir={out}", "name=w",
                                   "train.progress=false", *spec["overrides"]])
        start = time.perf_counter()
        trainer = build_trainer(cfg)
        build_s = time.perf_counter() - start
        batch = cfg.data.batch_size
        trainer.cfg.train.max_steps_per_epoch = 3  # first-step allocations, the pipeline's start
        trainer.train_epoch(0, RunState())
        steps = max(5, SWEEP_ROWS // batch)
        trainer.cfg.train.max_steps_per_epoch = steps
        _, samples_per_s = trainer.train_epoch(1, RunState())
        return {"samples_per_s": samples_per_s, "us_per_sample": 1e6 / samples_per_s, "steps": steps,
                "batch_size": batch, "build_s": build_s, "embedding_mb": trainer.embedding_mb_per_rank[0],
                "embedding_rows": sum(f.vocab_size for f in trainer.schema.sparse_fields),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def sweep_point(data: Path, overrides: list[str]) -> dict:
    spec = json.dumps({"data": str(data), "overrides": overrides})
    proc = subprocess.run([python(), "-m", "benchmarks.scale", "--worker", spec], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)})
    if proc.returncode != 0:
        raise RuntimeError(f"sweep point {overrides} on {data} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def oracle_auc(data: Path) -> float:
    """Test AUC of the hidden model's own click probabilities: the ceiling for any model."""
    import pyarrow.parquet as pq
    import torch

    from recsys.train.metrics import auc

    t = pq.read_table(data / "test.parquet", columns=["p_true", "label"])
    return auc(torch.from_numpy(t["p_true"].to_numpy()), torch.from_numpy(t["label"].to_numpy()))


def ranks(steps: int) -> dict:
    data = dataset("headline")
    out = {"oracle_test_auc": oracle_auc(data), "steps": steps, "runs": {}}
    for label, n, sharding in (("1 rank", 1, None), ("2 ranks, table-wise", 2, "table_wise"),
                               ("2 ranks, column-wise", 2, "column_wise")):
        overrides = [f"data.path={data}", f"train.max_steps_per_epoch={steps}"]
        if sharding:
            overrides.append(f"train.sharding_types=[{sharding}]")
        print(f"ranks: {label} ...", flush=True)
        run, wall = torchx_train(CONFIG, n, overrides)
        history = json.loads((run / "metrics.json").read_text())["history"][0]
        result = json.loads((run / "test_metrics.json").read_text())
        out["runs"][label] = {
            "ranks": n, "sharding_types": sharding, "command": torchx_command(n, overrides),
            "train_samples_per_s": history["train_samples_per_s"], "embedding_mb_per_rank":
                result["embedding_mb_per_rank"], "peak_rss_mb_rank0": result["peak_rss_mb_rank0"],
            "test_auc": result["test_auc"], "test_logloss": result["test_logloss"], "wall_s": wall,
            "plan": (run / "plan.txt").read_text()}
        shutil.rmtree(run.parent, ignore_errors=True)  # gigabytes of checkpoint
        print(f"  {history['train_samples_per_s']:,.0f} samples/s, MB per rank {result['embedding_mb_per_rank']}",
              flush=True)
    return out


def torchx_command(n: int, overrides: list[str]) -> str:
    shown = [o.replace(str(REPO) + "/", "") for o in overrides]
    return (f"torchx run -s local_cwd launch/components.py:train_local --config {CONFIG} -j 1x{n} "
            + " ".join(shown))


def capacity() -> dict:
    """The largest 16-d table (weights + row-wise Adagrad state) the planner places on one rank here."""
    import torch
    from torchrec.distributed.planner.types import PlannerError
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from recsys.experiment import load_config
    from recsys.train.distributed import HOST_RESERVE, fuse_embedding_optimizer, init_distributed, plan_tables

    env = init_distributed()
    optim = load_config(CONFIG, []).optim

    def fits(rows: int) -> bool:
        ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t", embedding_dim=16, num_embeddings=rows,
                                                                feature_names=["f"])], device=torch.device("meta"))
        fuse_embedding_optimizer(ebc, optim)  # the planner counts the optimizer state of fused tables
        try:
            plan_tables(ebc, env, per_rank_batch=4096, sharding_types=["table_wise"])
            return True
        except PlannerError:
            return False

    lo, hi = 1 << 20, 1 << 20
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > max(lo // 1000, 1):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"largest_rows_planned": lo, "weights_gb": lo * 16 * 4 / 1e9, "machine_memory_gb": memory / 1e9,
            "host_reserve": HOST_RESERVE, "optimizer": optim.embedding_optimizer}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in SWEEPS if p in result.get("sweeps", {})]
    if not parts:
        return
    fig, axes = plt.subplots(1, len(parts), figsize=(4.2 * len(parts), 3.6), squeeze=False)
    for ax, part in zip(axes[0], parts, strict=True):
        points = result["sweeps"][part]["points"]
        x = [p["value"] for p in points]
        ax.plot(x, [p["samples_per_s"] / 1e3 for p in points], "o-", color="tab:blue")
        ax.set_xscale("log", base=2 if part in ("batch", "dim", "features") else 10)
        ax.set_xlabel(result["sweeps"][part]["varies"])
        ax.set_ylabel("k samples/s", color="tab:blue")
        ax.set_ylim(bottom=0)
        twin = ax.twinx()
        twin.plot(x, [p["embedding_mb"] for p in points], "s--", color="tab:red")
        twin.set_ylabel("embedding MB (one rank)", color="tab:red")
        twin.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle("Training cost as the work grows (1 rank, DeepFM, synthetic click logs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def measured_by(result: dict, *parts: str) -> list[str]:
    runs = {(m["command"], m["commit"], m["date"]) for part in parts
            if (m := result.get("measured_by", {}).get(part))}
    return [f"Measured by `{c}` at commit {commit}, {date}." for c, commit, date in sorted(runs, key=lambda r: r[2])] + [""]


def report(result: dict) -> str:
    lines = ["# Industrial scale: large sharded tables on synthetic click logs", "",
             "Command: `python -m benchmarks.scale` (every part; `--parts` reruns some and keeps the others' figures, "
             "so each section names the run that measured it). "
             f"Model: `{CONFIG}` (DeepFM, 16-d unless varied, MLP 400-400, "
             "row-wise Adagrad fused into FBGEMM's backward, Adam on the dense part, batch 4096 unless varied). "
             "Data: `python -m recsys.data.synthetic` (seed 0), Zipf(1.05) ids, labels from a hidden model.", ""]
    if "ranks" in result:
        rk = result["ranks"]
        one = rk["runs"]["1 rank"]
        lines += ["## 1 rank and 2 gloo ranks (the real trainer through TorchX)", "",
                  f"The headline set: 10M rows (8M train), 26 categorical fields with vocabularies from 10^7 down "
                  f"to 10^3 ({embedding_rows('headline'):,} embedding rows), 3 multi-valued, 13 dense. Each "
                  f"run trains {rk['steps']} steps of 4096 rows, then evaluates the full valid and test splits "
                  f"(1M rows each). The hidden model's own probabilities reach test AUC "
                  f"{rk['oracle_test_auc']:.4f}.", "", *measured_by(result, "ranks"),
                  "| run | samples/s | embedding MB per rank (weights + optimizer state) | share of 1 rank | "
                  "peak RSS rank 0 (MB) | test AUC | wall (s) |", "|---|---|---|---|---|---|---|"]
        for label, r in rk["runs"].items():
            mb = r["embedding_mb_per_rank"]
            share = " / ".join(f"{m / one['embedding_mb_per_rank'][0]:.0%}" for m in mb)
            lines.append(f"| {label} | {r['train_samples_per_s']:,.0f} | {' / '.join(f'{m:,.0f}' for m in mb)} | "
                         f"{share} | {r['peak_rss_mb_rank0']:,.0f} | {r['test_auc']:.4f} | {r['wall_s']:.0f} |")
        lines += ["", "Commands (from the repository root, after `python -m benchmarks.scale` made the data):", ""]
        lines += [f"- {label}: `{r['command']}`" for label, r in rk["runs"].items()]
        for label, r in rk["runs"].items():
            lines += ["", f"<details><summary>plan: {label}</summary>", "", "```", r["plan"].rstrip(), "```", "",
                      "</details>"]
        lines += [""]
    if result.get("sweeps"):
        lines += ["## Cost as the work grows (1 rank)", "",
                  f"One process per point: build, 3 warm-up steps, then one timed pass of about {SWEEP_ROWS:,} "
                  "training rows through `Trainer.train_epoch` (loading and KJT construction included). "
                  "![scale](scale.png)", "", *measured_by(result, *result["sweeps"])]
        for sw in result["sweeps"].values():
            lines += [f"### {sw['varies']}", "", f"| {sw['varies']} | dataset | embedding rows | samples/s | "
                      "µs per sample | embedding MB | peak RSS (MB) | build (s) |", "|---|---|---|---|---|---|---|---|"]
            for p in sw["points"]:
                lines.append(f"| {p['value']:,} | {p['dataset']} | {p['embedding_rows']:,} | {p['samples_per_s']:,.0f} "
                             f"| {p['us_per_sample']:.1f} | {p['embedding_mb']:,.0f} | {p['peak_rss_mb']:,.0f} | "
                             f"{p['build_s']:.1f} |")
            lines += [""]
    if "capacity" in result:
        c = result["capacity"]
        trained = max((p for sw in result.get("sweeps", {}).values() for p in sw["points"]),
                      key=lambda p: p["embedding_mb"], default=None)
        lines += ["## The largest table on one rank", "", *measured_by(result, "capacity"),
                  f"The planner, given this machine's {c['machine_memory_gb']:.1f} GB less a {c['host_reserve']:.0%} "
                  f"reserve, places one 16-d table with {c['optimizer']} of at most "
                  f"**{c['largest_rows_planned']:,} rows** ({c['weights_gb']:.1f} GB of weights, plus the optimizer "
                  "state and the dense part) on one rank; a larger one is refused at planning time with a "
                  "`PlannerError` that names the storage it needs, before anything is allocated."]
        if trained:
            lines.append(f"The largest set trained here: {trained['embedding_rows']:,} embedding rows "
                         f"({trained['embedding_mb']:,.0f} MB of tables and optimizer state, peak RSS "
                         f"{trained['peak_rss_mb']:,.0f} MB) at {trained['samples_per_s']:,.0f} samples/s.")
        lines += [""]
    lines += ["## On GPUs", "",
              "The same code path: `make setup-cuda`, then the same data, and the planner may choose row-wise "
              "sharding (and HBM/UVM placement) there:", "",
              "```", "python -m recsys.data.synthetic --rows 100000000 --out /mnt/data/synthetic-100m",
              "torchrun --nproc_per_node 8 -m recsys.train --config benchmarks/configs/synthetic.yaml \\",
              "    data.path=/mnt/data/synthetic-100m 'train.sharding_types=[row_wise,table_wise,column_wise]'",
              "torchx run -s kubernetes launch/components.py:train_cluster --image IMAGE -j 2x8 --gpu 8 \\",
              "    --config benchmarks/configs/synthetic.yaml data.path=/mnt/data/synthetic-100m", "```", "",
              environment_line(result["environment"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)} (default all); a rerun keeps the other parts' figures")
    p.add_argument("--rank-steps", type=int, default=60, help="training steps of each TorchX run (default %(default)s)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    parts = [x for x in args.parts.split(",") if x]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"unknown part(s) {unknown}: choose from {', '.join(PARTS)}")
    path = RESULTS / "scale.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    command = "python -m benchmarks.scale " + " ".join(argv if argv is not None else sys.argv[1:])
    env = environment()
    result.update({"command": command, "environment": env})
    # A partial rerun keeps the other parts' figures, so each part records the run that measured it.
    for part in parts:
        result.setdefault("measured_by", {})[part] = {"command": command, "commit": env["commit"], "date": env["date"]}
    start = time.perf_counter()
    if "ranks" in parts:
        result["ranks"] = ranks(args.rank_steps)
    for part in (x for x in SWEEPS if x in parts):
        varies, points = SWEEPS[part]
        rows = []
        for value, name, overrides in points:
            data = dataset(name)
            print(f"{part}: {varies} = {value:,} ...", flush=True)
            point = {"value": value, "dataset": name, **sweep_point(data, overrides)}
            print(f"  {point['samples_per_s']:,.0f} samples/s, {point['embedding_mb']:,.0f} MB", flush=True)
            rows.append(point)
        result.setdefault("sweeps", {})[part] = {"varies": varies, "points": rows}
    if "capacity" in parts:
        result["capacity"] = capacity()
    result["seconds"] = time.perf_counter() - start
    write_json(path, result)
    plot(result, RESULTS / "scale.png")
    text = report(result)
    (RESULTS / "scale.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
