"""Batch-norm folding for the attack passes.

An attack runs the model in eval mode with frozen parameters, where a BatchNorm after a
convolution is a fixed per-channel affine map: conv(x; W, b) followed by BN equals one
convolution with W' = W * gamma / sqrt(var + eps) and b' = (b - mean) * gamma / sqrt(var + eps)
+ beta (the folding of Jacob et al., 2018, computed by torch.nn.utils.fusion). The folded
network gives the same logits and input gradients (up to float rounding) and skips every
BatchNorm forward and backward: on this project's CPU, BN backward was the costliest single
op of a PGD step (bench/gpu_profile.py), and on a GPU it removes a third of the kernels.

Why by hand: torch.fx.experimental.optimization.fuse does the same rewrite but deep-copies
and re-traces the model on every call; an attack needs the current weights each batch, so
the traced graph is cached here and only the folded weights are refreshed.
"""

from __future__ import annotations

import copy
import os
import weakref

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

# model -> (structure signature, folded network or None, [(folded conv, conv, bn)])
_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _signature(model: nn.Module) -> tuple:
    """Changes when pruning changes a shape (pruning edits the model in place)."""
    return tuple((name, tuple(t.shape)) for name, t in model.state_dict(keep_vars=True).items())


def _trace(model: nn.Module):
    """The model as an FX graph with each Conv2d -> BatchNorm2d pair replaced by one conv
    with its own (folded) weights; None when nothing folds or the model does not trace."""
    try:
        graph_module = torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - any model FX cannot trace runs unfolded
        return None, []
    modules = dict(graph_module.named_modules())
    pairs = []
    for node in list(graph_module.graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None:
            continue
        source = node.args[0]
        conv = modules.get(source.target) if getattr(source, "op", None) == "call_module" else None
        if not isinstance(conv, nn.Conv2d) or len(source.users) != 1:
            continue
        folded = copy.deepcopy(conv).requires_grad_(False)
        if folded.bias is None:
            folded.bias = nn.Parameter(torch.empty_like(bn.running_mean), requires_grad=False)
        # the traced graph shares the model's modules: swap in the copy on the graph's side only
        parent, _, name = source.target.rpartition(".")
        setattr(graph_module.get_submodule(parent) if parent else graph_module, name, folded)
        node.replace_all_uses_with(source)
        graph_module.graph.erase_node(node)
        pairs.append((folded, conv, bn))
    if not pairs:
        return None, []
    graph_module.graph.lint()
    graph_module.recompile()
    return graph_module, pairs


@torch.no_grad()
def folded(model: nn.Module) -> nn.Module:
    """The network an attack should call: ``model`` with its BatchNorms folded into the
    convolutions before them, for the model's current weights and running statistics.

    Only valid in eval mode (the caller, ``attacks.attack_mode``, ensures it). Returns
    ``model`` itself when nothing folds (no Conv->BN pair, or a model FX cannot trace), for a
    model that says ``foldable = False`` (learned.MaskedModel: its weights are made on each
    call), or when the environment sets ``MRPF_FOLD_BN=0`` (for benchmarks and debugging).
    """
    if os.environ.get("MRPF_FOLD_BN", "1") == "0" or not getattr(model, "foldable", True):
        return model
    signature = _signature(model)
    cached = _CACHE.get(model)
    if cached is None or cached[0] != signature:
        cached = (signature, *_trace(model))
        _CACHE[model] = cached
    _, network, pairs = cached
    if network is None:
        return model
    for target, conv, bn in pairs:
        weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                            bn.weight, bn.bias)
        if target.weight.device != weight.device or target.weight.dtype != weight.dtype:
            target.to(device=weight.device, dtype=weight.dtype)
        target.weight.copy_(weight)
        target.bias.copy_(bias)
    return network
