#!/usr/bin/env bash
# The one-GPU evidence run (bench/gpu_evidence.py): one device call of at most 9 minutes.
# The lent machine has torch, timm, scipy, pyyaml, tabulate and pytest but no registry;
# carry .gpu (git-ignored) with:
#   .gpu/whl    wheels of torch-pruning, pyautoattack, tqdm, matplotlib (installed from there)
#   .gpu/data   cifar10-train-00000{0..4}.tar.gz and cifar10-test-000000.tar.gz (18 MB)
#   bash bench/gpu_evidence.sh [BUDGET_S]          # default 480: the rest of 9 minutes is start-up
#   GPU_EVIDENCE_SMOKE=1 bash bench/gpu_evidence.sh # the same steps, tiny, on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
missing=$(python3 - <<'PY'
import importlib.util
print(" ".join(p for m, p in [("torch_pruning", "torch-pruning"), ("pyautoattack", "pyautoattack"),
                               ("tqdm", "tqdm"), ("matplotlib", "matplotlib")] if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
  echo "installing: $missing"
  python3 -m pip install -q --no-index --find-links .gpu/whl $missing
fi
if [ "${GPU_EVIDENCE_SMOKE:-0}" = 1 ]; then
  exec python3 -m bench.gpu_evidence --smoke --budget-s "${1:-300}" ${GPU_EVIDENCE_DATA:+--data "$GPU_EVIDENCE_DATA"} \
    ${GPU_EVIDENCE_WORK:+--work "$GPU_EVIDENCE_WORK"}
fi
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)"
exec python3 -m bench.gpu_evidence --budget-s "${1:-480}" --data .gpu/data
