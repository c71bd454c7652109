"""Preparation time and peak memory for MovieLens-1M (target: under 60 s and 4 GB on 2 cores).

    python -m benchmarks.prepare_speed [--repeats 3]

Each repeat is a fresh ``python -m recsys.prepare`` process; peak memory is that process's max RSS.
Results: benchmarks/results/prepare.{json,md}.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.common import REPO, RESULTS, environment, python, write_json


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-1m")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    times, peaks = [], []
    for _ in range(args.repeats):
        out = tempfile.mkdtemp(prefix="bench-prepare-")
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        start = time.perf_counter()
        subprocess.run([python(), "-m", "recsys.prepare", "--dataset", args.dataset, "--out", f"{out}/d",
                        "--no-progress"], cwd=REPO, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
        peaks.append(max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024)
    result = {"command": "python -m benchmarks.prepare_speed " + " ".join(sys.argv[1:]), "dataset": args.dataset,
              "wall_s": times, "peak_rss_mb": max(peaks), "environment": environment()}
    write_json(RESULTS / "prepare.json", result)
    env = result["environment"]
    md = (f"# Preparation of {args.dataset}\n\nCommand: `{result['command']}`\n\n"
          f"Wall time per run (whole process, including Python start-up and imports): median "
          f"{statistics.median(times):.1f} s ({', '.join(f'{t:.1f}' for t in times)}); peak memory "
          f"{max(peaks):,.0f} MB. Target: under 60 s and 4 GB.\n\n"
          f"Environment: {env['cpu']}, {env['cores']} cores, Python {env['python']}; commit {env['commit']}, "
          f"{env['date']}.\n")
    (RESULTS / "prepare.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
