"""State dicts laid out as RobustBench's WideResNet and PreActResNet save them, written here
from the published layout (not from mrpf.models), with random weights and BN statistics."""

from __future__ import annotations

import torch


def _bn(state: dict, prefix: str, channels: int, gen: torch.Generator) -> None:
    state[f"{prefix}.weight"] = 1 + 0.1 * torch.randn(channels, generator=gen)
    state[f"{prefix}.bias"] = 0.1 * torch.randn(channels, generator=gen)
    state[f"{prefix}.running_mean"] = 0.1 * torch.randn(channels, generator=gen)
    state[f"{prefix}.running_var"] = 1 + 0.1 * torch.rand(channels, generator=gen)
    state[f"{prefix}.num_batches_tracked"] = torch.tensor(100)


def _conv(state: dict, key: str, out: int, inp: int, k: int, gen: torch.Generator) -> None:
    state[key] = torch.randn(out, inp, k, k, generator=gen) * (2 / (k * k * out)) ** 0.5


def _preact_block(state: dict, prefix: str, inp: int, out: int, shortcut: str, gen: torch.Generator) -> None:
    """bn1 (input width), conv1, bn2, conv2 and, where the widths differ, the 1x1 ``shortcut``."""
    _bn(state, f"{prefix}.bn1", inp, gen)
    _conv(state, f"{prefix}.conv1.weight", out, inp, 3, gen)
    _bn(state, f"{prefix}.bn2", out, gen)
    _conv(state, f"{prefix}.conv2.weight", out, out, 3, gen)
    if inp != out:
        _conv(state, f"{prefix}.{shortcut}.weight", out, inp, 1, gen)


def robustbench_wrn(depth: int, widen: int, classes: int = 10, seed: int = 0) -> dict:
    """A state dict as RobustBench's ``WideResNet(depth, widen_factor=widen)`` saves it
    (robustbench/model_zoo/architectures/wide_resnet.py), written from the published layout."""
    gen = torch.Generator().manual_seed(seed)
    widths = [16, 16 * widen, 32 * widen, 64 * widen]
    state: dict = {}
    _conv(state, "conv1.weight", widths[0], 3, 3, gen)
    for b in (1, 2, 3):
        for i in range((depth - 4) // 6):
            inp = widths[b - 1] if i == 0 else widths[b]
            _preact_block(state, f"block{b}.layer.{i}", inp, widths[b], "convShortcut", gen)
    _bn(state, "bn1", widths[3], gen)
    state["fc.weight"] = 0.1 * torch.randn(classes, widths[3], generator=gen)
    state["fc.bias"] = torch.zeros(classes)
    return state


def robustbench_preact18(classes: int = 10, bn_before_fc: bool = False, seed: int = 0) -> dict:
    """A state dict as RobustBench's ``PreActResNet(PreActBlock[V2], [2, 2, 2, 2])`` saves it
    (robustbench/model_zoo/architectures/resnet.py; both block variants have the same keys)."""
    gen = torch.Generator().manual_seed(seed)
    state: dict = {}
    _conv(state, "conv1.weight", 64, 3, 3, gen)
    inp = 64
    for s, planes in enumerate((64, 128, 256, 512), start=1):
        for j in range(2):
            _preact_block(state, f"layer{s}.{j}", inp, planes, "shortcut.0", gen)
            inp = planes
    if bn_before_fc:
        _bn(state, "bn", 512, gen)
    state["linear.weight"] = 0.1 * torch.randn(classes, 512, generator=gen)
    state["linear.bias"] = torch.zeros(classes)
    return state
