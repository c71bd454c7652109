#!/usr/bin/env bash
# Run every fault test N times in a row (default 10) while another CPU-heavy process runs, and print how each
# run ended and how long detection and recovery took. Usage: benchmarks/faults.sh [N] > log
# The record built from its output is benchmarks/results/faults.md.
set -u
cd "$(dirname "$0")/.."
N=${1:-10}
TESTS=(
  "tests/test_launch.py::test_lost_rank_fails_fast_then_rerun_resumes"
  "tests/test_launch.py::test_lost_rank_restarts_by_itself"
  "tests/test_launch.py::test_restarted_ranks_form_a_new_group_every_time"
  "tests/test_launch.py::test_a_group_that_cannot_form_ends_the_process"
)
.venv/bin/python -c "while True: pass" &  # the competing CPU-heavy process
HOG=$!
trap 'kill $HOG' EXIT
echo "faults.sh: $N rounds, $(nproc) cores, CPU hog pid $HOG, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD)"
for i in $(seq 1 "$N"); do
  for t in "${TESTS[@]}"; do
    start=$(date +%s)
    out=$(.venv/bin/python -m pytest -q -s -p no:cacheprovider "$t" 2>&1)
    rc=$?
    echo "round $i ${t##*::} rc=$rc $(( $(date +%s) - start ))s $(grep -o 'FAULT.*' <<<"$out" | tr '\n' ' ')$(grep -oE '[0-9]+ (passed|failed)' <<<"$out" | tr '\n' ' ')"
    [ $rc -ne 0 ] && echo "$out" | tail -40
  done
done
