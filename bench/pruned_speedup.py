"""Benchmark c of docs/performance.md: is a pruned model really faster?

For each pruned checkpoint: speedup = dense latency / pruned latency (median forward time of
one batch, interleaved rounds) against the MACs ratio = dense MACs / pruned MACs; the
target is speedup >= 0.7 x MACs ratio on CPU (0.8 on an H100). Latency does not depend on
the weights, only on the channel counts, so any pruned checkpoint of the dense model works.

    python -m bench.pruned_speedup [--dense EVIDENCE/dense/checkpoint.pt]
        [--pruned EVIDENCE/{uniform_l1,mrpf}-{0.5,0.7}-s0/checkpoint.pt] [--batch 128] [--device cpu]
        [--threads N] [--name NAME]
    python -m bench.pruned_speedup --per-layer --name pruned-layers-cpu   # where each model's time goes

``--per-layer`` adds, per model, each convolution's MACs and median forward time (timed by
module hooks, the GPU synchronised around each), to show which layers the time stays in.
``--onnx`` also exports each model (``mrpf export``) and times it in ONNX Runtime (CPU; the
CUDA provider where the device is CUDA and ORT has it), in the same interleaved rounds: the
speedup where a pruned model is deployed.

EVIDENCE is the `evidence` grid's results for the core acceptance model
(``experiments/evidence/results/cifar10/vgg11_w2/pgd_at``; ``snakemake --config grid=evidence``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import ROOT, write
from mrpf.config import DeviceParams
from mrpf.devices import setup
from mrpf.evaluation import load_model
from mrpf.models import count_ops
from mrpf.timing import latency_ms

EVIDENCE = "experiments/evidence/results/cifar10/vgg11_w2/pgd_at"
DEFAULT_DENSE = f"{EVIDENCE}/dense/checkpoint.pt"
DEFAULT_PRUNED = [f"{EVIDENCE}/{m}-{s}-s0/checkpoint.pt" for s in ("0.5", "0.7") for m in ("uniform_l1", "mrpf")]


def per_layer(model: torch.nn.Module, size: int, runtime, batch: int, repeats: int) -> list[dict]:
    """Per convolution: MACs per image and median forward time (ms) inside the whole forward pass."""
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    sync = torch.cuda.synchronize if runtime.device.type == "cuda" else (lambda: None)
    starts, times, macs = {}, {name: [] for name, _ in convs}, {}

    def before(name):
        def hook(module, inputs):
            sync()
            starts[name] = time.perf_counter()
        return hook

    def after(name):
        def hook(module, inputs, out):
            sync()
            times[name].append(1000 * (time.perf_counter() - starts[name]))
            kh, kw = module.kernel_size
            macs[name] = out[0].numel() * module.in_channels // module.groups * kh * kw
        return hook

    handles = [m.register_forward_pre_hook(before(name)) for name, m in convs]
    handles += [m.register_forward_hook(after(name)) for name, m in convs]
    x = torch.rand(batch, 3, size, size, device=runtime.device).contiguous(memory_format=runtime.memory_format)
    with torch.no_grad():
        for _ in range(repeats + 3):
            model(x)
    for handle in handles:
        handle.remove()
    return [{"layer": name, "macs": macs[name], "ms": statistics.median(times[name][3:])} for name, _ in convs]


def onnx_session(checkpoint: Path, folder: Path, device: str, threads: int | None = None):
    """An ONNX Runtime session of the exported checkpoint (CUDA provider on a CUDA device if ORT
    has it; ``threads`` intra-op threads, default ORT's own choice)."""
    import onnxruntime as ort

    from mrpf.export import ONNX_FILE, export

    export(checkpoint, folder, log=lambda m: None)
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(folder / ONNX_FILE), options, providers=providers)


def onnx_latency_ms(session, size: int, batch: int, repeats: int) -> float:
    """Median time (ms) of one ONNX Runtime run on a batch, after two warm-up runs."""
    x = torch.rand(batch, 3, size, size).numpy()
    name = session.get_inputs()[0].name
    for _ in range(2):
        session.run(None, {name: x})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, {name: x})
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", default=DEFAULT_DENSE)
    p.add_argument("--pruned", nargs="+", default=DEFAULT_PRUNED)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cuda-graphs", choices=["on", "off"], default="on",
                   help="on CUDA: time the forward pass replayed from a CUDA graph (mrpf's default) or eagerly")
    p.add_argument("--per-layer", action="store_true", help="also each convolution's MACs and time, per model")
    p.add_argument("--onnx", action="store_true", help="also time each model exported to ONNX in ONNX Runtime")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of PyTorch and of ONNX Runtime (default: each one's own choice)")
    p.add_argument("--name", default=None, help="results file name (default: pruned-speedup-DEVICE)")
    args = p.parse_args()
    runtime = setup(DeviceParams(name=args.device, channels_last=True, bf16=False, threads=args.threads,
                                 cuda_graphs=args.cuda_graphs == "on"))
    paths = [ROOT / args.dense] + [ROOT / q for q in args.pruned]
    models = {}
    for path in paths:
        if not path.is_file():
            sys.exit(f"bench: {path} not found (run the evidence grid first: "
                     f"snakemake --cores all --config grid=evidence; or pass --dense / --pruned)")
        model, state = load_model(path, runtime)
        models[path] = (model, state["arch"]["input_size"])
    scratch = tempfile.TemporaryDirectory()
    sessions = {path: onnx_session(path, Path(scratch.name) / str(i), args.device, args.threads)
                for i, path in enumerate(paths)} if args.onnx else {}
    times = {path: [] for path in paths}
    onnx_times = {path: [] for path in sessions}
    for _ in range(args.rounds):      # interleaved rounds: drift in machine speed hits every model
        for path, (model, size) in models.items():
            times[path].append(latency_ms(model, size, runtime, args.batch, args.repeats))
            if path in sessions:
                onnx_times[path].append(onnx_latency_ms(sessions[path], size, args.batch, args.repeats))
    dense_path = paths[0]
    dense_ms = statistics.median(times[dense_path])
    dense_macs = count_ops(models[dense_path][0], models[dense_path][1])["macs"]
    rows = []
    for path in paths[1:]:
        ms = statistics.median(times[path])
        macs = count_ops(models[path][0], models[path][1])["macs"]
        speedup, macs_ratio = dense_ms / ms, dense_macs / macs
        rows.append({"model": str(path.relative_to(ROOT).parent), "latency_ms": ms, "macs": macs,
                     "speedup": speedup, "macs_ratio": macs_ratio, "speedup_over_macs_ratio": speedup / macs_ratio})
        if sessions:
            onnx_speedup = statistics.median(onnx_times[dense_path]) / statistics.median(onnx_times[path])
            rows[-1].update(onnx_latency_ms=statistics.median(onnx_times[path]), onnx_speedup=onnx_speedup,
                            onnx_speedup_over_macs_ratio=onnx_speedup / macs_ratio)
    result = {"batch": args.batch, "threads": torch.get_num_threads(),
              "cuda_graphs": args.device.startswith("cuda") and args.cuda_graphs == "on",
              "dense": {"latency_ms": dense_ms, "macs": dense_macs}, "pruned": rows}
    if sessions:
        result["dense"]["onnx_latency_ms"] = statistics.median(onnx_times[dense_path])
        result["onnx_providers"] = sessions[dense_path].get_providers()
    if args.per_layer:
        result["layers"] = {str(path.relative_to(ROOT).parent):
                            per_layer(model, size, runtime, args.batch, args.repeats)
                            for path, (model, size) in models.items()}
    write(args.name or f"pruned-speedup-{args.device}", result)


if __name__ == "__main__":
    main()
