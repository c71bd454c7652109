"""One set of weights is one function, whatever the sharding plan and world size.

Every backbone, and every method on it (LLaCTR, ELEC gain with either injection, ELEC student with its
teacher), and the per-position path (sequence tables in an EmbeddingCollection), is built unsharded on CPU with seeded, perturbed weights; its logits and losses on fixed batches
are the reference, and its weights go into a DCP checkpoint. ``plan_worker.py`` then loads that checkpoint
into the task sharded by DistributedModelParallel under each plan the project offers on CPU (1 rank; 2 gloo
ranks table-wise, column-wise, table-column-wise, and all three mixed) and must give the same logits and
losses to 1e-5. A field order that followed the plan (the bug this guards) breaks every positional model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from synthetic_tables import random_method_tables

from recsys.data.schema import PreparedSchema
from recsys.experiment import load_config
from recsys.models import BACKBONES

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("plan_worker.py")
BATCH, NUM_BATCHES, TOLERANCE = 16, 3, 1e-5
TWO_RANK_PLANS = [("table_wise", ["table_wise"]), ("column_wise", ["column_wise"]),
                  ("table_column_wise", ["table_column_wise"]), ("mixed", ["mixed"])]


SEQUENCE_FIELDS = ["hist_item_id", "hist_genre"]  # their tables (item_id's, genres') move into an EC
CASES_PER_BACKBONE = 6


def _cases(data: Path, tables: dict[str, Path], root: Path) -> list[tuple[str, list[str], list[str]]]:
    """(name, overrides, sequence fields read position by position)."""
    lm = [f"method.elec.user_table={tables['user']}", f"method.elec.item_table={tables['item']}"]
    cases = []
    for b in BACKBONES:
        common = [f"data.path={data}", f"model.backbone={b}", "model.embedding_dim=8"]
        cases += [
            (f"{b}", common, []),
            (f"{b}_sequences", common, SEQUENCE_FIELDS),
            (f"{b}_llactr", [*common, "method.name=llactr", f"method.llactr.field_table={tables['field']}"], []),
            (f"{b}_gain_fields", [*common, "method.name=elec_gain", "method.elec.inject=fields", *lm], []),
            (f"{b}_gain_logit", [*common, "method.name=elec_gain", *lm], []),
            (f"{b}_student", [*common, "method.name=elec_student", f"method.elec.teacher_run={root / f'{b}_gain_fields'}",
                              "method.elec.score_weight=1", "method.elec.rep_weight=1"], []),
        ]
    return cases


@pytest.fixture(scope="module")
def spec(tiny_prepared, tmp_path_factory) -> Path:
    """Reference outputs and checkpoints of every case, and the worker's spec file."""
    from plan_worker import build_case, reference_batches

    _, data, _ = tiny_prepared
    schema = PreparedSchema.load(data)
    root = tmp_path_factory.mktemp("plans")
    tables = random_method_tables(root / "tables", schema)
    batches = reference_batches(str(data), schema, BATCH, NUM_BATCHES)
    reference, cases, states = {}, [], {}
    for seed, (name, overrides, sequences) in enumerate(_cases(data, tables, root)):
        cfg = load_config(None, overrides)
        torch.manual_seed(seed)
        task = build_case(schema, cfg, sequences, device=torch.device("cpu"))
        with torch.no_grad():  # every weight matters: no zero biases, no identity adaptor
            for p in task.parameters():
                p.add_(0.05 * torch.randn_like(p))
        if name.endswith("_student"):  # its teacher is the gain network's run
            task.teacher.load_state_dict(states[name.replace("_student", "_gain_fields")])
        states[name] = task.state_dict()
        task.eval()
        with torch.no_grad():
            outs = [task(b) for b in batches]
        reference[name] = {"loss": [o[0] for o in outs], "logits": [o[1]["logits"] for o in outs]}
        run = root / name
        checkpoint = run / "checkpoints" / "best"
        dcp.save({"model": task.state_dict()}, checkpoint_id=str(checkpoint))
        (checkpoint / "meta.json").write_text("{}")
        (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
        cases.append({"name": name, "overrides": overrides, "checkpoint": str(checkpoint), "sequences": sequences})
    torch.save(reference, root / "reference.pt")
    path = root / "spec.json"
    path.write_text(json.dumps({"data": str(data), "batch_size": BATCH, "num_batches": NUM_BATCHES,
                                "reference": str(root / "reference.pt"), "cases": cases}))
    return path


def _run_worker(spec: Path, ranks: int, plans: list[tuple[str, list[str] | None]]) -> list[dict]:
    data = json.loads(spec.read_text())
    data["plans"] = [{"name": n, "types": t} for n, t in plans]
    run_spec = spec.with_name(f"spec_{ranks}.json")
    run_spec.write_text(json.dumps(data))
    out = spec.with_name(f"result_{ranks}.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           str(WORKER), str(run_spec), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{WORKER.parent}"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def _assert_invariant(results: list[dict]) -> None:
    # only the per-position tables refuse a plan, and only table-column-wise (EmbeddingCollection lacks it)
    refused = {(r["plan"], r["case"]) for r in results if "refused" in r}
    assert refused == {(r["plan"], r["case"]) for r in results
                       if r["plan"] == "table_column_wise" and r["case"].endswith("_sequences")}, refused
    assert all("per-position (sequence) table" in r["refused"] for r in results if "refused" in r)
    wrong = [f"{r['plan']}/{r['case']} rank {r['rank']}: logits differ by {r['max_logit_diff']:.2e}, "
             f"loss by {r['max_loss_diff']:.2e}"
             for r in results if "refused" not in r
             and not (r["max_logit_diff"] <= TOLERANCE and r["max_loss_diff"] <= TOLERANCE)]
    assert not wrong, "\n".join(wrong)


@pytest.mark.distributed
def test_one_rank_gives_the_unsharded_function(spec):
    results = _run_worker(spec, 1, [("one_rank", None)])
    assert len(results) == CASES_PER_BACKBONE * len(BACKBONES)
    _assert_invariant(results)


@pytest.mark.distributed
def test_every_two_rank_plan_gives_the_unsharded_function(spec):
    results = _run_worker(spec, 2, TWO_RANK_PLANS)
    assert len(results) == 2 * len(TWO_RANK_PLANS) * CASES_PER_BACKBONE * len(BACKBONES)
    _assert_invariant(results)
    # the plans really are what they are called: tables on both ranks, split columns, all types at once
    plans = {r["plan"]: r["sharding"] for r in results if r["case"] == "deepfm_student"}
    assert "[1]" in plans["table_wise"] and "[0]" in plans["table_wise"]
    assert "[0, 1]" in plans["column_wise"]
    assert all(t in plans["mixed"] for t in ("table_wise", "column_wise", "table_column_wise"))
    sequences = next(r["sharding"] for r in results if r["case"] == "deepfm_sequences" and r["plan"] == "table_wise")
    assert "t_hist_item_id" not in sequences and "t_item_id" in sequences  # one item table for both paths
