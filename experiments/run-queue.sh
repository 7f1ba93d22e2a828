#!/usr/bin/env bash
# Run the jobs of a .jobs file (experiments/cifar10-subset.jobs) with W workers, each
# pinned to one CPU core with one thread (on 2 cores two 1-thread workers beat one
# 2-thread run). A job whose eval.json exists is skipped, so rerunning resumes.
#   bash experiments/run-queue.sh experiments/cifar10-subset.jobs [WORKERS] [RUNS_DIR]
set -euo pipefail
jobs_file=$1; workers=${2:-2}; runs=${3:-runs/compare}
params=configs/core-acceptance.yaml
# The fine-tuning budget every method gets: 3 steps, 1 TRADES epoch after each, 2 more after the last;
# MRS with the PGD-10 probe these runs used (the default became PGD-5 afterwards).
finetune="prune.steps=3 prune.finetune_epochs=1 prune.final_epochs=2 prune.finetune_method=trades mrs.steps=10"
checkpoint=runs/core-acceptance/checkpoint.pt
[ -f "$checkpoint" ] || { echo "missing $checkpoint: run 'mrpf train --params $params --run core-acceptance' first" >&2; exit 2; }
mkdir -p "$runs/.claims"
worker() {
  local core=$1
  grep -v '^\s*#' "$jobs_file" | grep -v '^\s*$' | while read -r name overrides; do
    [ -f "$runs/$name/eval.json" ] && continue
    mkdir "$runs/.claims/$name" 2>/dev/null || continue   # atomic claim: one worker per job
    echo "[core $core] $name $(date +%T)"
    mkdir -p "$runs/$name"
    # shellcheck disable=SC2086
    taskset -c "$core" mrpf prune --params "$params" --run "$name" --runs-dir "$runs" --threads 1 \
        --checkpoint "$checkpoint" $finetune $overrides \
        > "$runs/$name/log.txt" 2>&1 &&
    taskset -c "$core" mrpf evaluate --params "$params" --run "$name" --runs-dir "$runs" --threads 1 \
        evaluate.attacks=[clean,pgd] >> "$runs/$name/log.txt" 2>&1 ||
      { echo "[core $core] $name FAILED (see $runs/$name/log.txt)"; rmdir "$runs/.claims/$name"; }
  done
}
for ((w = 0; w < workers; w++)); do worker "$((w % $(nproc)))" & done
wait
echo "all jobs done $(date +%T)"
