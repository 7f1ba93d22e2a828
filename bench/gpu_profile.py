"""Where the GPU time goes: the follow-up to bench/gpu_check.sh (docs/performance.md).

1. mrpf's training loop (mrpf.training.train, second of two epochs, ResNet-18, PGD-10, batch 128) with
   each combination of device.bf16 and device.channels_last, and without BN folding in the
   attack (MRPF_FOLD_BN=0), next to the reference loop.
2. A torch.profiler view of one PGD-10 training step: GPU kernel time vs wall time, and the
   ops that spend most host time (a GPU waiting on the host is "launch-bound").
3. Latency of the pruned models with their channel counts as pruned, and with each group's
   kept channels rounded up to a multiple of 8 (tensor-core friendly), fp32/bf16 x NCHW/NHWC.
4. torch.compile of the model for the same PGD step (compile time, then step time).

    python -m bench.gpu_profile [--images 5120] [--deadline-s 200] [--parts loops profile latency compile]
        [--latency-batch 2048 ...]
Results: bench/results/gpu-profile-DEVICE.json, written after every part.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import torch

from bench.common import ROOT, timed, write
from bench.throughput import bench_params, mrpf_train, reference_train, subset_npz, training_step
from mrpf import groups as groups_mod
from mrpf.config import DeviceParams
from mrpf.devices import setup
from mrpf.models import build_model, count_ops, load_model


def profile_step(device: str, arch: str, bf16: bool, channels_last: bool) -> dict:
    from torch.profiler import ProfilerActivity, profile

    runtime = setup(DeviceParams(name=device, channels_last=channels_last, bf16=bf16))
    model = runtime.prepare(build_model(arch, 10, 32)).train()
    run = training_step(model, runtime, "pgd_at", 128, 10)
    for _ in range(3):
        run()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    wall = 1000 * timed(run, 5, device)
    with profile(activities=activities) as prof:
        for _ in range(3):
            run()
        if device == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    def device_us(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0

    kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(device_us(e) for e in kernels) / 3      # kernels only: op rows repeat their kernels' time
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    n_kernels = sum(e.count for e in kernels) / 3
    return {"bf16": bf16, "channels_last": channels_last, "step_wall_ms": wall, "step_gpu_kernel_ms": gpu_us / 1000,
            "gpu_busy_fraction": gpu_us / 1000 / wall if wall else None, "kernels_per_step": n_kernels,
            "top_host_ops": [{"op": e.key, "calls_per_step": e.count / 3,
                              "self_cpu_ms_per_step": e.self_cpu_time_total / 3000,
                              "self_gpu_ms_per_step": device_us(e) / 3000} for e in top]}


def rounded_copy(dense: torch.nn.Module, pruned: torch.nn.Module, size: int, classes: int, multiple: int):
    """The dense model pruned by magnitude to the pruned model's kept channels, each rounded up
    to a multiple of ``multiple``."""
    model = copy.deepcopy(dense).cpu()
    graph, found = groups_mod.find_groups(model, size, classes)
    _, kept_groups = groups_mod.find_groups(copy.deepcopy(pruned).cpu(), size, classes)
    remove = {}
    for group, kept in zip(found, kept_groups):
        keep = min(group.channels, -(-kept.channels // multiple) * multiple)
        order = torch.argsort(groups_mod.channel_magnitude(model, group))
        remove[group.id] = order[: group.channels - keep].tolist()
    groups_mod.prune(graph, found, remove)
    return model


def latency_table(device: str, batch: int) -> list[dict]:
    from mrpf.timing import latency_ms

    base = ROOT / ".gpu" / "ckpt" if (ROOT / ".gpu" / "ckpt").is_dir() else None
    if base is None:
        return []
    cpu = setup(DeviceParams(name="cpu", channels_last=False, bf16=False))
    dense, state = load_model(base / "dense" / "checkpoint.pt", cpu)
    size, classes = state["arch"]["input_size"], state["arch"]["num_classes"]
    models = {"dense": dense}
    for name in ("uniform_l1-0.5", "uniform_l1-0.7", "mrpf-0.5", "mrpf-0.7"):
        pruned, _ = load_model(base / name / "checkpoint.pt", cpu)
        models[name] = pruned
        models[name + "-r8"] = rounded_copy(dense, pruned, size, classes, 8)
    rows = []
    for bf16 in (False, True):
        for channels_last in (False, True):
            runtime = setup(DeviceParams(name=device, channels_last=channels_last, bf16=bf16))
            dtype = torch.bfloat16 if bf16 else torch.float32
            ms = {}
            for name, model in models.items():
                m = runtime.prepare(copy.deepcopy(model)).eval().to(dtype)
                ms[name] = min(latency_ms(m, size, runtime, batch, 20, dtype) for _ in range(2))
            macs = {name: count_ops(runtime.prepare(copy.deepcopy(m)).eval(), size)["macs"]
                    for name, m in models.items()}
            for name in models:
                rows.append({"model": name, "bf16": bf16, "channels_last": channels_last, "batch": batch,
                             "latency_ms": ms[name], "speedup": ms["dense"] / ms[name],
                             "macs_ratio": macs["dense"] / macs[name],
                             "speedup_over_macs_ratio": ms["dense"] / ms[name] / (macs["dense"] / macs[name])})
    return rows


def loop_rates(args, tmp: Path) -> list[dict]:
    """Part 1: the second of two epochs of each loop configuration."""
    npz = subset_npz(args.images, tmp)
    loops = []
    # two epochs each, the second reported: the first carries cuDNN autotuning for each
    # new layout and dtype (run 2 on the H100 showed one-epoch figures depend on order)
    params = bench_params(npz, "pgd_at", args.arch, 10, 128, args.device, False, 2)
    loops.append({"loop": "reference (fp32, NCHW, DataLoader)",
                  "images_per_s": reference_train(params, npz)[1][-1]})
    fold_setting = os.environ.get("MRPF_FOLD_BN")
    configs = ([(bf16, cl, "1") for bf16 in (False, True) for cl in (False, True)]
               + [(True, True, "0"), (True, False, "0")])
    for bf16, channels_last, fold in configs:
        os.environ["MRPF_FOLD_BN"] = fold
        params = bench_params(npz, "pgd_at", args.arch, 10, 128, args.device, bf16, 2)
        params = params.replace("device", channels_last=channels_last)
        _, rates = mrpf_train(params, tmp / f"{bf16}-{channels_last}-{fold}")
        loops.append({"loop": f"mrpf bf16={bf16} channels_last={channels_last} fold_bn={fold == '1'}",
                      "images_per_s": rates[-1]})
        print(loops[-1], flush=True)
    if fold_setting is None:      # the later parts run as the caller's environment says
        os.environ.pop("MRPF_FOLD_BN", None)
    else:
        os.environ["MRPF_FOLD_BN"] = fold_setting
    return loops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--images", type=int, default=5120)
    p.add_argument("--latency-batch", type=int, nargs="+", default=[2048])
    p.add_argument("--parts", nargs="+", choices=["loops", "profile", "latency", "compile"],
                   default=["loops", "profile", "latency", "compile"])
    p.add_argument("--name", default=None, help="results file name (default: gpu-profile-DEVICE)")
    p.add_argument("--deadline-s", type=float, default=200)
    args = p.parse_args()
    start = time.monotonic()
    result: dict = {"device": args.device, "arch": args.arch, "k": 10, "batch": 128, "images": args.images}
    name = args.name or f"gpu-profile-{args.device}"
    with tempfile.TemporaryDirectory() as tmp:
        if "loops" in args.parts:
            result["loops"] = loop_rates(args, Path(tmp))
    write(name, result)
    for part, run in (("profile", lambda: [profile_step(args.device, args.arch, bf16, cl)
                                           for bf16, cl in ((False, False), (True, True))]),
                      ("latency", lambda: [row for batch in args.latency_batch
                                           for row in latency_table(args.device, batch)])):
        if part not in args.parts:
            continue
        try:
            result[part] = run()
        except Exception as e:  # noqa: BLE001 - one broken part must not lose the others on a one-shot machine
            result[part] = {"error": repr(e)}
        write(name, result)
    if "compile" in args.parts and time.monotonic() - start < args.deadline_s:
        runtime = setup(DeviceParams(name=args.device, channels_last=False, bf16=True))
        model = runtime.prepare(build_model(args.arch, 10, 32)).train()
        eager = 1000 * timed(training_step(model, runtime, "pgd_at", 128, 10), 5, args.device)
        compiled = torch.compile(model)
        run = training_step(compiled, runtime, "pgd_at", 128, 10)
        t0 = time.perf_counter()
        run()
        run()
        compile_s = time.perf_counter() - t0
        result["compile"] = {"bf16": True, "channels_last": False, "eager_step_ms": eager,
                             "compile_and_2_steps_s": compile_s,
                             "compiled_step_ms": 1000 * timed(run, 10, args.device)}
        write(name, result)


if __name__ == "__main__":
    main()
