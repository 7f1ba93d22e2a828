"""Benchmark c at full width: is a pruned ResNet-18 / VGG-16 faster in proportion to its MACs?

bench/pruned_speedup.py measures the project's trained VGG-11/2 checkpoints, which are small
enough that an H100 runs them far below its compute peak. Latency depends on the channel
counts only, not on the weights, so this script prunes randomly initialised full-width
models to 50 % and 70 % fewer MACs (kept channels rounded to multiples of 8, as
``prune.round_to`` does on the paper grid) in two shapes, and times them like c:

- ``uniform``: every group loses the same fraction (the budget solver with alpha = 0);
- ``deep``: deeper groups lose more (synthetic MRS falling with depth, alpha = 1), the shape
  MRPF gave VGG-11, whose early layers came out most sensitive.

    python -m bench.pruned_width [--archs resnet18 vgg16] [--batches 256 2048] [--device cuda]
    python -m bench.pruned_width --profile --archs resnet18 --batches 2048   # where the GPU time goes
Results: bench/results/pruned-width-DEVICE.json (with --profile: pruned-width-profile-DEVICE.json).

``--profile`` instead sums, per forward pass of the dense model and of each pruned one, the
GPU kernel time by kind (read from the kernel names: convolution, batch norm, the rest),
to show which part of the time shrinks with the MACs.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench.common import write
from mrpf import groups as groups_mod
from mrpf.allocation import prune_copy, solve
from mrpf.config import DeviceParams
from mrpf.devices import setup
from mrpf.models import build_model, count_ops
from mrpf.timing import latency_ms


def pruned_models(arch: str, budgets: list[float]) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    dense = build_model(arch, 10, 32).eval()
    _, found = groups_mod.find_groups(dense, 32, 10)
    models = {"dense": dense}
    shapes = {"uniform": ([1.0] * len(found), 0.0, False),
              "deep": ([1.0 / (i + 1) for i in range(len(found))], 1.0, True)}
    for budget in budgets:
        for shape, (mrs, alpha, cost_aware) in shapes.items():
            plan = solve(dense, found, mrs, input_size=32, num_classes=10, budget=budget, alpha=alpha,
                         cost_aware=cost_aware, round_to=8)
            models[f"{shape}-{budget}"] = prune_copy(dense, 32, 10, plan["ratios"], 8)[0]
    return models


CONV_KERNELS = ("conv", "gemm", "xmma", "implicit", "cutlass", "fprop", "winograd", "sm80_", "sm90_")


def kernel_kind(name: str) -> str:
    low = name.lower()
    if any(k in low for k in CONV_KERNELS):
        return "convolution"
    if "norm" in low or "bn_" in low:
        return "batch_norm"
    return "other (ReLU, add, pooling, layout)"


def kernel_profile(model: torch.nn.Module, batch: int, dtype: torch.dtype, runtime) -> dict:
    """Kernel time (ms) of one eager forward pass, summed by kind, and the kernel count: GPU
    kernels on CUDA; on the CPU (a dry run of this script) the ops' own CPU time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = runtime.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    x = torch.rand(batch, 3, 32, 32, device=runtime.device, dtype=dtype).contiguous(memory_format=runtime.memory_format)
    with torch.no_grad():
        for _ in range(3):
            model(x)
        sync()
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                model(x)
            sync()
    kind_of_device = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    kinds: dict[str, float] = {}
    count = 0
    for e in prof.key_averages():
        if getattr(e, "device_type", None) != kind_of_device:
            continue
        us = ((getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0) if cuda
              else e.self_cpu_time_total)
        kinds[kernel_kind(e.key)] = kinds.get(kernel_kind(e.key), 0.0) + us / 5000
        count += e.count
    return {"kernel_ms_by_kind": kinds, "kernel_ms": sum(kinds.values()), "kernels": count / 5}


def settings(args):
    """Each architecture's dense and pruned models, with the runtime and dtype of fp32 and of bf16."""
    for arch in args.archs:
        models = pruned_models(arch, args.budgets)
        for bf16 in (False, True):
            runtime = setup(DeviceParams(name=args.device, channels_last=True, bf16=bf16))
            yield arch, models, bf16, runtime, torch.bfloat16 if bf16 else torch.float32


def profile_main(args) -> None:
    rows = []
    for arch, models, bf16, runtime, dtype in settings(args):
        for batch in args.batches:
            for name, m in models.items():
                result = kernel_profile(runtime.prepare(m).to(dtype).eval(), batch, dtype, runtime)
                rows.append({"arch": arch, "model": name, "bf16": bf16, "batch": batch, **result})
                print(arch, "bf16" if bf16 else "fp32", batch, name,
                      {k: round(v, 3) for k, v in result["kernel_ms_by_kind"].items()}, flush=True)
    write(args.name or f"pruned-width-profile-{args.device}", {"channels_last": True, "round_to": 8, "rows": rows})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["resnet18", "vgg16"])
    p.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.7])
    p.add_argument("--batches", nargs="+", type=int, default=[256, 2048])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--profile", action="store_true", help="GPU kernel time by kind instead of latency (CUDA)")
    p.add_argument("--name", default=None)
    args = p.parse_args()
    if args.profile:
        profile_main(args)
        return
    rows = []
    for arch, models, bf16, runtime, dtype in settings(args):
        ready = {name: runtime.prepare(m).to(dtype) for name, m in models.items()}
        macs = {name: count_ops(m.float(), 32)["macs"] for name, m in ready.items()}
        ready = {name: m.to(dtype) for name, m in ready.items()}
        for batch in args.batches:
            times = {name: [] for name in ready}
            for _ in range(args.rounds):     # interleaved: drift in machine speed hits every model
                for name, m in ready.items():
                    times[name].append(latency_ms(m, 32, runtime, batch, args.repeats, dtype))
            dense_ms = statistics.median(times["dense"])
            for name in ready:
                ms = statistics.median(times[name])
                ratio = macs["dense"] / macs[name]
                rows.append({"arch": arch, "model": name, "bf16": bf16, "batch": batch, "latency_ms": ms,
                             "macs": macs[name], "speedup": dense_ms / ms, "macs_ratio": ratio,
                             "speedup_over_macs_ratio": dense_ms / ms / ratio})
                print(f"{arch} {'bf16' if bf16 else 'fp32'} batch {batch} {name}: {ms:.3f} ms, "
                      f"speedup {dense_ms / ms:.2f} / MACs ratio {ratio:.2f} = {dense_ms / ms / ratio:.2f}",
                      flush=True)
    write(args.name or f"pruned-width-{args.device}", {"channels_last": True, "round_to": 8, "rows": rows})


if __name__ == "__main__":
    main()
