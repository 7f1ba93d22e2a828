#!/usr/bin/env bash
# Benchmark e of docs/performance.md: wall time to plan the full `paper` grid (1,409 jobs)
# with `snakemake -n` and `dvc status` (dvc.yaml generated for that grid in a scratch copy).
#   bash bench/planning.sh          -> bench/results/planning.json
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=$(mktemp -d); trap 'rm -rf "$scratch"' EXIT
cp -r Snakefile workflow params.yaml "$scratch"/
cd "$scratch"
git init -q && dvc init -q
t0=$(date +%s.%N); snakemake -n --config grid=paper --cores 1 > snakemake.txt 2>&1; t1=$(date +%s.%N)
mrpf dvcyaml grid=paper >/dev/null 2>&1
t2=$(date +%s.%N); dvc status > dvc.txt 2>&1 || true; t3=$(date +%s.%N)
jobs=$(grep -E "^total" snakemake.txt | head -1 | awk '{print $2}')
cd - >/dev/null
python3 - "$t0" "$t1" "$t2" "$t3" "$jobs" <<'PY'
import sys
from bench.common import write
t0, t1, t2, t3 = map(float, sys.argv[1:5])
write("planning", {"grid": "paper", "snakemake_jobs": int(sys.argv[5]), "snakemake_dry_run_s": t1 - t0,
                   "dvc_status_s": t3 - t2, "target_s": 10})
PY
