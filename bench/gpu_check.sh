#!/usr/bin/env bash
# GPU check: run whenever the lent GPU machine is available (<= 8 minutes on one H100).
# Runs the CUDA tests, then on the GPU: benchmark a with accuracy (ResNet-18, PGD-10, 10,000
# real images: mrpf and the reference loop train for the same epochs, as many as fit
# ACCURACY_BUDGET_S, then clean and PGD-20 test accuracy of both), a with mrpf's CUDA graphs
# off, a for TRADES, a with mrpf's bf16 off (one epoch each after a warm-up epoch: where the
# speedup comes from), b (step efficiency), and c (pruned speedup, batch 256 and 2048,
# forward passes replayed from CUDA graphs); prints the ratios.
# Results: bench/results/*cuda*.json (also copied to $OUT where that is set).
#
# The lent machine has torch, timm, scipy, pyyaml, tabulate and pytest but no registry;
# carry (all optional, each git-ignored):
#   .gpu/site   unpacked torch-pruning and pyautoattack (or wheels in .whl/, installed from there)
#   .gpu/data   cifar10-subset-{train,test}.npz (else ../shared/data; else generated images)
#   .gpu/ckpt   {dense,uniform_l1-0.5,uniform_l1-0.7,mrpf-0.5,mrpf-0.7}/checkpoint.pt for c
#               (else the evidence grid's dense and *-s0 runs; c is skipped without them)
#   bash bench/gpu_check.sh
#   GPU_CHECK_SMOKE=1 bash bench/gpu_check.sh     # the same steps, tiny, on the CPU (tests this script)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .gpu/site ] && export PYTHONPATH="$PWD/.gpu/site:$PYTHONPATH"
[ -d .gpu/data ] && export MRPF_BENCH_DATA="$PWD/.gpu/data"
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

if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
  device=cpu; tag=cpu-smoke
  size=(--arch vgg11_w8 --steps 2 --images 512 --test-images 200); epochs=2; budget=20; batches=(64)
else
  device=cuda; tag=cuda
  python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)"
  size=(--arch resnet18 --steps 10 --images 10000 --test-images 2000); epochs=15
  budget=${ACCURACY_BUDGET_S:-110}; batches=(256 2048)
fi
start=$(date +%s); status=0
rm -f bench/results/*-"$tag"*.json      # results of an earlier check must not pass for this one's
copy_out() { if [ -n "${OUT:-}" ]; then cp bench/results/*"$tag"*.json "$OUT"/ 2>/dev/null || true; fi; }
# one step: its last output line; a failing step is reported and the next ones still run
step() { "$@" | tail -n 1 || { status=1; echo "FAILED: $*"; }; copy_out; }

if [ "$device" = cuda ]; then
  echo "== CUDA tests (graph capture vs eager, training, evaluation)"
  timeout "${CUDA_TESTS_TIMEOUT_S:-180}" python3 -m pytest -q -rs -p no:cacheprovider -m cuda tests/test_cuda.py \
    2>&1 | tee "${OUT:-/tmp}/cuda-tests.txt" || { status=1; echo "CUDA tests FAILED"; }
fi

echo "== a, b: PGD-AT, same epochs for both loops, then test accuracy ($(date +%T))"
step python -m bench.throughput --device $device "${size[@]}" --methods pgd_at --accuracy --epochs $epochs \
  --budget-s "$budget" --name "throughput-$tag-accuracy"
echo "== a: PGD-AT with mrpf's CUDA graphs off ($(date +%T))"
step python -m bench.throughput --device $device "${size[@]}" --methods pgd_at --warmup-rounds 1 --rounds 1 \
  --cuda-graphs off --name "throughput-$tag-nographs"
if [ -d .gpu/ckpt ]; then
  ckpt=.gpu/ckpt; dense=$ckpt/dense/checkpoint.pt
  pruned=($ckpt/{uniform_l1,mrpf}-{0.5,0.7}/checkpoint.pt)
else
  evidence=experiments/evidence/results/cifar10/vgg11_w2/pgd_at
  dense=$evidence/dense/checkpoint.pt
  pruned=($evidence/{uniform_l1,mrpf}-{0.5,0.7}-s0/checkpoint.pt)
fi
if [ -f "$dense" ]; then
  for b in "${batches[@]}"; do
    echo "== c: pruned speedup, batch $b, forward replayed from a CUDA graph ($(date +%T))"
    step python -m bench.pruned_speedup --device $device --batch "$b" --dense "$dense" --pruned "${pruned[@]}" \
      --name "pruned-speedup-$tag-b$b"
  done
else
  echo "== c: skipped: no checkpoints ($dense missing; see the header of this script)"
fi

echo "== a: TRADES, one epoch each after a discarded warm-up epoch ($(date +%T))"
step python -m bench.throughput --device $device "${size[@]}" --methods trades --warmup-rounds 1 --rounds 1 \
  --name "throughput-$tag-trades"
echo "== a: PGD-AT with mrpf's bf16 off ($(date +%T))"
step python -m bench.throughput --device $device "${size[@]}" --methods pgd_at --warmup-rounds 1 --rounds 1 \
  --bf16 off --name "throughput-$tag-fp32"

TAG=$tag python3 - <<'PY'
import glob, json, os
tag = os.environ["TAG"]


def load(name):
    try:
        return json.load(open(f"bench/results/{name}.json"))
    except OSError:
        print(f"{name}: no result (its step failed or did not run)")


acc = load(f"throughput-{tag}-accuracy")
if acc:
    a = acc["pgd_at"]
    print(f"machine: {acc['machine']['gpu'] or acc['machine']['cpu']}, torch {acc['machine']['torch']}")
    print(f"a: PGD-AT {a['mrpf_images_per_s']:.0f} vs {a['reference_images_per_s']:.0f} img/s = {a['ratio']:.2f}x "
          f"the reference loop (target >= 3), after {a['epochs']} epochs each:")
    for name, r in a["test_accuracy"].items():
        d = r["mrpf_minus_reference"]
        print(f"   {name}: mrpf {100 * r['mrpf']:.1f} %, reference {100 * r['reference']:.1f} %, "
              f"difference {100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] points")
    print(f"b: step efficiency {acc['step']['step_efficiency']:.2f} (limit 1.0)")
for name, method, what in (("nographs", "pgd_at", "PGD-AT with mrpf's CUDA graphs off"),
                           ("trades", "trades", "TRADES"), ("fp32", "pgd_at", "PGD-AT with mrpf in fp32")):
    r = load(f"throughput-{tag}-{name}")
    if r:
        r = r[method]
        print(f"a: {what}: {r['mrpf_images_per_s']:.0f} vs {r['reference_images_per_s']:.0f} img/s = {r['ratio']:.2f}x")
for path in sorted(glob.glob(f"bench/results/pruned-speedup-{tag}-b*.json")):
    c = json.load(open(path))
    for r in c["pruned"]:
        print(f"c: batch {c['batch']}: {r['model']}: speedup {r['speedup']:.2f} / MACs ratio {r['macs_ratio']:.2f} = "
              f"{r['speedup_over_macs_ratio']:.2f} (target >= 0.8)")
PY
echo "gpu_check: $(( $(date +%s) - start )) s"
exit $status
