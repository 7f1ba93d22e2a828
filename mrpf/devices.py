"""Device choice, thread count, channels_last, bf16 autocast and CUDA graphs."""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch

from . import gpu_slots
from .config import DeviceParams
from .errors import MrpfError


@dataclasses.dataclass(frozen=True)
class Runtime:
    device: torch.device
    channels_last: bool
    bf16: bool          # autocast to bfloat16 for training (CUDA, or a CPU with bf16 support); evaluation stays fp32
    cuda_graphs: bool = False  # replay each training step from a CUDA graph (mrpf/gradient_step.py); CUDA only

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self, cache_enabled: bool = True):
        """bf16 autocast when asked for (CUDA; or a CPU with AMX / AVX512-BF16, where oneDNN
        runs bf16 convolutions; `python -m bench.throughput --bf16 on`, docs/performance.md);
        a no-op otherwise. ``cache_enabled=False`` while a CUDA graph is captured."""
        if self.bf16 and self.device.type in ("cuda", "cpu"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)
        return contextlib.nullcontext()

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device, memory_format=self.memory_format)


def on_side_stream(device: torch.device, fn):
    """Run ``fn()`` on a fresh CUDA stream, ordered after and before the current stream's work.

    Warm-up before a CUDA graph capture belongs there (PyTorch's CUDA-graphs notes): cuDNN
    autotuning and lazy initialisation must not happen on the capturing stream."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream(device).wait_stream(side)
    return out


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MrpfError(f"device.name: unknown device {name!r} (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MrpfError(f"device.name: {name!r} asked for, but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MrpfError(f"device.name: {name!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    elif device.type != "cpu":
        raise MrpfError(f"device.name: unsupported device {name!r} (auto, cpu, cuda or cuda:N)")
    return device


def setup(device_params: DeviceParams, log=None) -> Runtime:
    """Apply ``device.*`` params (threads, cuDNN autotuning) and return the runtime choice.

    With ``auto``/``cuda`` and GPUs present, the job first claims its own GPU from the
    slot pool (mrpf/gpu_slots.py); ``MRPF_GPU_SLOTS=0`` turns that off."""
    name = device_params.name
    if name in ("auto", "cuda") and os.environ.get("MRPF_GPU_SLOTS", "1") != "0":
        if os.environ.get("MRPF_FAKE_GPUS") or torch.cuda.is_available():
            gpu_slots.claim(log=log)
    device = resolve_device(name)
    if device_params.threads is not None:
        torch.set_num_threads(device_params.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return Runtime(device, device_params.channels_last, device_params.bf16, device_params.cuda_graphs)
