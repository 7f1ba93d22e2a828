#!/usr/bin/env bash
# GPU check: run whenever a session has the lent accelerator (<= 8 minutes on one H100).
# Installs what is missing (the lent machine has torch, timm, scipy, pyyaml, tabulate,
# pytest but no registry: carry wheels in .whl/ or unpacked packages in .gpu/site),
# runs the CUDA tests, benchmarks a (throughput vs the reference loop, step efficiency)
# and c (pruned speedup), and prints the ratios. Results: bench/results/*-cuda.json.
#   bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .gpu/site ] && export PYTHONPATH="$PWD/.gpu/site:$PYTHONPATH"
missing=$(python3 - <<'PY'
import importlib.util
print(" ".join(p for m, p in [("torch_pruning", "torch-pruning"), ("pyautoattack", "pyautoattack"),
                               ("tqdm", "tqdm"), ("matplotlib", "matplotlib")] if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
  echo "installing: $missing"
  python3 -m pip install -q --no-index --find-links .whl $missing
fi
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)"
start=$(date +%s)
echo "== CUDA tests"; python3 -m pytest -q -rs -m cuda tests/test_cuda.py
echo "== a, b: throughput vs reference loop (ResNet-18, PGD-10, batch 128, 10,000 images)"
python3 bench/throughput.py --device cuda --arch resnet18 --steps 10 --images 10000 --rounds 1
echo "== c: pruned speedup"
python3 bench/pruned_speedup.py --device cuda --batch 256
python3 - <<'PY'
import json
a = json.load(open("bench/results/throughput-cuda.json"))
c = json.load(open("bench/results/pruned-speedup-cuda.json"))
print(f"a: PGD-AT {a['pgd_at']['ratio']:.2f}x, TRADES {a['trades']['ratio']:.2f}x the reference loop (target >= 3)")
print(f"b: step efficiency {a['step']['step_efficiency']:.2f} (limit 1.0)")
for r in c["pruned"]:
    print(f"c: {r['model']}: speedup {r['speedup']:.2f} / MACs ratio {r['macs_ratio']:.2f} = "
          f"{r['speedup_over_macs_ratio']:.2f} (target >= 0.8)")
PY
echo "gpu_check: $(( $(date +%s) - start )) s"
