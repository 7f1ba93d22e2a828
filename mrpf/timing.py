"""Wall time of a forward pass: the one timing helper below evaluation, latency tables and
pruning (``evaluate``'s latency, NetAdapt-style layer tables, the calibrated latency budget)."""

from __future__ import annotations

import statistics
import time

import torch

from . import devices


def timed_ms(forward, device: torch.device, repeats: int, warmup: int = 3, reduce=statistics.median) -> float:
    """Wall time (ms) of ``forward()`` over ``repeats`` calls after ``warmup`` calls, synchronising
    CUDA around each, reduced by ``reduce`` (median; the table takes the fastest, ``min``, the
    pass least disturbed by other work on a shared machine)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.no_grad():
        for i in range(repeats + warmup):
            sync()
            t0 = time.perf_counter()
            forward()
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000)
    return reduce(times)


def latency_ms(model: torch.nn.Module, input_size: int, runtime: devices.Runtime, batch: int, repeats: int,
               dtype: torch.dtype = torch.float32, reduce=statistics.median) -> float:
    """Median (or ``reduce``) wall time (ms) of one forward pass on a batch (inputs in ``dtype``,
    the model's), after warm-up.

    On CUDA with ``device.cuda_graphs`` the forward pass is captured once and replayed from a
    CUDA graph: the time the GPU needs, without eager PyTorch's launch cost per op, which
    dominates small models there (docs/performance.md); it is what a deployment through CUDA
    graphs or TensorRT pays.
    """
    x = torch.rand(batch, 3, input_size, input_size, device=runtime.device, dtype=dtype).contiguous(
        memory_format=runtime.memory_format)
    forward = lambda: model(x)  # noqa: E731
    if runtime.device.type == "cuda" and runtime.cuda_graphs:
        with torch.no_grad():
            devices.on_side_stream(runtime.device, lambda: [model(x) for _ in range(3)])   # warm-up
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                model(x)
        forward = graph.replay
    return timed_ms(forward, runtime.device, repeats, reduce=reduce)
