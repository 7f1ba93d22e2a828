#!/usr/bin/env bash
# Recipe search for the core acceptance run (>= 52 % clean, >= 34 % PGD-20 on the 2,000-image
# CIFAR-10 subset, <= 15 min of CPU training). Accuracy after a fixed number of epochs does not
# depend on the device, so candidates are trained side by side (on a GPU when one is lent) and
# the winner is then confirmed on the 2-core CPU.
#   bench/recipe_sweep.sh RECIPES.txt TRAIN.npz TEST.npz OUT_DIR   # train + evaluate every line
#   bench/recipe_sweep.sh summarize OUT_DIR                       # table of what finished
# RECIPES.txt: one candidate per line, "name override override ...".
set -u
summarize() {
  python3 - "$1" <<'PY'
import csv, json, pathlib, sys
rows = []
for ev in sorted(pathlib.Path(sys.argv[1]).glob("*/eval.json")):
    m, t = json.loads(ev.read_text()), json.loads((ev.parent / "train_metrics.json").read_text())
    h = list(csv.DictReader(open(ev.parent / "history.csv")))
    ips = sum(float(r["images_per_s"]) for r in h) / len(h)
    rows.append(f"{ev.parent.name:24s} clean {m['clean_acc']:.4f}  pgd20 {m['pgd_acc']:.4f}  params {m['params']:>7}  "
                f"train {t['train_seconds']:.0f}s  {ips:.0f} img/s on {m['device']}")
print("\n".join(rows))
pathlib.Path(sys.argv[1], "summary.txt").write_text("\n".join(rows) + "\n")
PY
}
if [ "$1" = summarize ]; then summarize "$2"; exit; fi
recipes=$1 train=$2 test=$3 out=$4
data="data.train_path=$train data.test_path=$test"
mkdir -p "$out"
while read -r name overrides; do
  [ -z "$name" ] && continue
  { mrpf train --run "$name" --runs-dir "$out" $data $overrides \
    && mrpf evaluate --run "$name" --runs-dir "$out" $data evaluate.attacks=[clean,pgd] $overrides; } \
    > "$out/$name.log" 2>&1 &
done < "$recipes"
wait
summarize "$out"
