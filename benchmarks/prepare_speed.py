"""Preparation time and peak memory for MovieLens-1M (target: under 60 s and 4 GB on 2 cores).

    python -m benchmarks.prepare_speed [--repeats 3] [--compare-with REV]

Each repeat is a fresh ``python -m recsys.prepare`` process; peak memory is that process's max RSS. With
``--compare-with REV`` the same preparation from another commit's code (a git worktree) runs in turn with this
one, alternating, so that both see the same machine load: the record gives their ratio.
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
from pathlib import Path

from benchmarks.common import REPO, RESULTS, environment, environment_line, python, write_json


def _once(code: Path, dataset: str) -> float:
    out = tempfile.mkdtemp(prefix="bench-prepare-")
    start = time.perf_counter()
    # cwd first on sys.path: `python -m` runs the code of the folder it starts in
    subprocess.run([python(), "-m", "recsys.prepare", "--dataset", dataset, "--out", f"{out}/d", "--no-progress",
                    "--raw", str(REPO.parent / "shared" / "data" / dataset)] if dataset == "ml-1m" else
                   [python(), "-m", "recsys.prepare", "--dataset", dataset, "--out", f"{out}/d", "--no-progress"],
                   cwd=code, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-1m")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compare-with", default=None, metavar="REV", help="also time this commit's preparation")
    args = p.parse_args()
    other = None
    if args.compare_with:
        other = Path(tempfile.mkdtemp(prefix="bench-prepare-rev-")) / "code"
        subprocess.run(["git", "worktree", "add", "--detach", str(other), args.compare_with], cwd=REPO, check=True,
                       capture_output=True)
    times, peaks, other_times = [], [], []
    try:
        for _ in range(args.repeats):
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            times.append(_once(REPO, args.dataset))
            peaks.append(max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024)
            if other is not None:
                other_times.append(_once(other, args.dataset))
    finally:
        if other is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=REPO, capture_output=True)
    result = {"command": "python -m benchmarks.prepare_speed " + " ".join(sys.argv[1:]), "dataset": args.dataset,
              "wall_s": times, "peak_rss_mb": max(peaks), "environment": environment()}
    if other is not None:
        result |= {"compared_with": args.compare_with, "compared_wall_s": other_times,
                   "ratio": statistics.median(times) / statistics.median(other_times)}
    write_json(RESULTS / "prepare.json", result)
    env = result["environment"]
    md = (f"# Preparation of {args.dataset}\n\nCommand: `{result['command']}`\n\n"
          f"Wall time per run (whole process, including Python start-up and imports): median "
          f"{statistics.median(times):.1f} s ({', '.join(f'{t:.1f}' for t in times)}); peak memory "
          f"{max(peaks):,.0f} MB. Target: under 60 s and 4 GB.\n\n"
          + (f"The code of commit {args.compare_with}, timed in turn with it in the same run: median "
             f"{statistics.median(other_times):.1f} s ({', '.join(f'{t:.1f}' for t in other_times)}); this code "
             f"takes {result['ratio']:.2f}x its time.\n\n" if other is not None else "")
          +
          environment_line(env, packages=False) + "\n")
    (RESULTS / "prepare.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
