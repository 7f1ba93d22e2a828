"""Loss and gradients of one training batch, replayed from a CUDA graph on the GPU.

A PGD-k training step is (k + 1) forward and backward passes of small kernels, about
3,000 per step for ResNet-18 at CIFAR size; on an H100 eager PyTorch spends longer
launching them than the GPU spends running them (docs/performance.md, "Where the H100
time goes"). Captured once in a CUDA graph (``torch.cuda.graph``, the whole-step capture
of PyTorch's CUDA-graphs notes) and replayed, a step costs one launch.

What is captured: the objective (attack and training forward) and its backward, for one
batch shape, into static tensors: input, labels, loss, logits and the parameters' ``.grad``.
The optimizer step, the lr schedule, the EMA and the finite-loss check stay eager, so the
learning rate stays a Python float and the schedulers need nothing special. A batch of
another shape (an epoch's last, smaller batch) runs eagerly and leaves its gradients in the
same ``.grad`` tensors the graph writes. The first ``warmup`` full batches (those shaped
like the first batch) also run eagerly, on a side stream (cuDNN autotuning and lazy
initialisation must not happen during capture); they are real training steps. A model
whose step cannot be captured (an op that syncs with the host) trains eagerly, with one
line saying why.

Why by hand: ``torch.cuda.make_graphed_callables`` graphs a module's forward and backward
but not a step whose attack differentiates the model with respect to its input inside the
forward; ``torch.compile(mode="reduce-overhead")`` breaks its graph at that
``autograd.grad`` and took 35 s to compile the step (docs/performance.md).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import devices
from .objectives import Adversary, Objective


class GradientStep:
    """``step(x, y) -> (loss, logits)``, detached, with every trainable parameter's ``.grad`` set.

    The returned tensors are overwritten by the next call on the graph path: read them
    (or queue work on them) before calling again.
    """

    def __init__(self, model: nn.Module, objective: Objective, adversary: Adversary, beta: float,
                 runtime: devices.Runtime, log=print, warmup: int = 3):
        self.model, self.objective, self.adversary, self.beta = model, objective, adversary, beta
        self.runtime, self.log, self.warmup = runtime, log, warmup
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.use_graph = runtime.device.type == "cuda" and runtime.cuda_graphs
        self.eager_full_batches = 0
        self.shape = None    # (shape, stride) of the batches to capture: those of the first batch
        self.graph = None    # torch.cuda.CUDAGraph once captured
        self.static: dict[str, torch.Tensor] = {}
        self.static_grads: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.use_graph:
            return self._eager(x, y)
        layout = (x.shape, x.stride())
        if self.shape is None:
            self.shape = layout      # an epoch's first batch is a full one
        if layout != self.shape:
            loss, logits = self._eager(x, y)
            for p, static in zip(self.params, self.static_grads):   # where the graph and optimizer read them
                if static is not None and p.grad is not None:
                    static.copy_(p.grad)
                    p.grad = static
            return loss, logits
        if self.graph is not None:
            self.static["x"].copy_(x)
            self.static["y"].copy_(y)
            self.graph.replay()
            return self.static["loss"], self.static["logits"]
        if self.eager_full_batches < self.warmup:
            self.eager_full_batches += 1
            return devices.on_side_stream(self.runtime.device, lambda: self._eager(x, y))
        return self._capture(x, y)

    def _eager(self, x: torch.Tensor, y: torch.Tensor, cache_casts: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        with self.runtime.autocast(cache_enabled=cache_casts):
            loss, logits = self.objective(self.model, x, y, self.adversary, self.beta)
        for p in self.params:
            p.grad = None
        loss.backward()
        return loss.detach(), logits.detach()

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Capture the step on this batch, then replay it (capture records kernels, runs none)."""
        static = {"x": x.clone(memory_format=torch.preserve_format), "y": y.clone()}
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                # autocast's cast cache would hand the graph tensors from outside its memory pool
                static["loss"], static["logits"] = self._eager(static["x"], static["y"], cache_casts=False)
        except RuntimeError as error:
            for p in self.params:
                p.grad = None
            self.use_graph = False
            self.log(f"CUDA graph capture of the training step failed; training eagerly "
                     f"({str(error).splitlines()[0]})")
            return self._eager(x, y)
        self.graph, self.static = graph, static
        self.static_grads = [p.grad for p in self.params]
        self.log(f"training step captured as a CUDA graph (batches of {len(x)}); replayed from here on")
        graph.replay()
        return static["loss"], static["logits"]
