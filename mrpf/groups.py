"""Prunable units (Torch-Pruning dependency groups), reversible channel masks, physical pruning.

A *group* is a set of coupled channels that must be removed together: a conv's output
channels with their batch norm and the next layer's input channels, every member of a
residual add, and so on. Torch-Pruning's dependency graph (Fang et al., CVPR 2023,
"DepGraph") finds them for any traceable model, so a torchvision CNN needs no registry
entry. Sensitivities and ratios are kept per group, never per conv: in Torch-Pruning a
ratio set on one member of a coupled group silently applies to the whole group.

Pruned architectures are stored as Torch-Pruning's *pruning history* (module name,
out/in, channel indices: plain data), replayed on the dense model at load time, so pruned
checkpoints still load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch
import torch.nn as nn

from .errors import MrpfError


@dataclasses.dataclass
class Group:
    """One prunable unit: ``id`` is stable for a given architecture (graph order)."""

    id: int
    root: str                   # the module whose output channels define the group
    members: list[str]          # modules whose *output* channels are removed with it
    channels: int
    tp_group: object = dataclasses.field(repr=False, default=None)

    def describe(self) -> dict:
        return {"id": self.id, "root": self.root, "members": self.members, "channels": self.channels}


def classifier_head(model: nn.Module, num_classes: int) -> list[nn.Module]:
    """The output layer(s): the last Linear / 1x1 conv producing ``num_classes`` outputs (never pruned)."""
    heads = [m for m in model.modules()
             if (isinstance(m, nn.Linear) and m.out_features == num_classes)
             or (isinstance(m, nn.Conv2d) and m.out_channels == num_classes)]
    if not heads:
        raise MrpfError(f"cannot find the classifier layer with {num_classes} outputs to protect from pruning")
    return heads[-1:]


def protected_layers(model: nn.Module, num_classes: int) -> list[nn.Module]:
    """Layers whose output channels are never pruned: the classifier head, and the qkv
    projection of attention blocks (timm's MobileViT), so heads and head dims stay
    consistent; the transformer's embedding width and every conv remain prunable."""
    qkv = [m.qkv for m in model.modules() if hasattr(m, "num_heads") and isinstance(getattr(m, "qkv", None), nn.Linear)]
    return classifier_head(model, num_classes) + qkv


def dependency_graph(model: nn.Module, input_size: int):
    import torch_pruning as tp

    device = next(model.parameters()).device
    example = torch.zeros(1, 3, input_size, input_size, device=device)
    was_training = model.training
    model.eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    model.train(was_training)
    return graph


def find_groups(model: nn.Module, input_size: int, num_classes: int) -> tuple[object, list[Group]]:
    """The dependency graph and every prunable group of ``model`` (classifier outputs excluded)."""
    graph = dependency_graph(model, input_size)
    names = {m: n for n, m in model.named_modules()}
    groups = []
    for tp_group in graph.get_all_groups(ignored_layers=protected_layers(model, num_classes),
                                         root_module_types=(nn.Conv2d, nn.Linear)):
        root_dep, root_idxs = tp_group[0]
        members = []
        for dep, _ in tp_group:
            module = dep.target.module
            if graph.is_out_channel_pruning_fn(dep.handler) and isinstance(module, nn.Module) \
                    and names.get(module) not in members and module in names:
                members.append(names[module])
        if len(root_idxs) < 2:
            continue  # a single channel cannot be pruned without removing the layer
        groups.append(Group(len(groups), names[root_dep.target.module], members, len(root_idxs), tp_group))
    return graph, groups


def out_channel_params(model: nn.Module, group: Group) -> list[torch.Tensor]:
    """Parameters indexed by the group's channels along dim 0 (weights and biases of its members)."""
    modules = dict(model.named_modules())
    params = []
    for name in group.members:
        module = modules[name]
        for attr in ("weight", "bias"):
            p = getattr(module, attr, None)
            if isinstance(p, torch.Tensor) and p.dim() >= 1 and p.shape[0] == group.channels:
                params.append(p)
    return params


def channel_magnitude(model: nn.Module, group: Group) -> torch.Tensor:
    """L1 norm per channel of the group's root weights (the usual magnitude criterion; Li et al. 2017)."""
    root = dict(model.named_modules())[group.root]
    return root.weight.detach().abs().flatten(1).sum(1)


@contextlib.contextmanager
def masked(model: nn.Module, group: Group, channels: torch.Tensor) -> Iterator[None]:
    """Zero ``channels`` of ``group`` in every member (conv/linear weights and biases, BN affine),
    so their outputs vanish; restore the exact values on exit (the MRS probe)."""
    params = out_channel_params(model, group)
    saved = [p.detach()[channels].clone() for p in params]
    with torch.no_grad():
        for p in params:
            p[channels] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            for p, values in zip(params, saved):
                p[channels] = values


def prune(graph, groups: list[Group], remove: dict[int, list[int]]) -> list:
    """Physically remove channels: ``remove`` maps group id -> channel indices (at the current width).

    Returns the pruning history of this call (append it to the checkpoint's history).
    """
    before = len(graph.pruning_history())
    by_id = {g.id: g for g in groups}
    for group_id, idxs in remove.items():
        if not idxs:
            continue
        group = by_id[group_id]
        if len(idxs) >= group.channels:
            raise MrpfError(f"group {group_id} ({group.root}): cannot remove all {group.channels} channels")
        root_dep, _ = group.tp_group[0]
        tp_group = graph.get_pruning_group(root_dep.target.module, root_dep.handler, sorted(int(i) for i in idxs))
        tp_group.prune()
    return [list(h) for h in graph.pruning_history()[before:]]


def replay(model: nn.Module, history: list, input_size: int) -> nn.Module:
    """Re-apply a stored pruning history to a freshly built dense model (before loading weights)."""
    if history:
        graph = dependency_graph(model, input_size)
        graph.load_pruning_history([(str(n), bool(out), [int(i) for i in idxs]) for n, out, idxs in history])
    return model
