"""The global-threshold baselines: channel scores, and the search for the global threshold.

Each baseline scores every channel of every group, then removes the globally lowest-scored
channels until the budget is met (at most ``allocation.removal_cap`` of any group):

- ``global_magnitude``: mean |w| over the group's out-channel parameters;
- ``taylor_adv``: first-order Taylor importance |sum_w w dL_adv/dw| per channel (Molchanov
  et al., CVPR 2019), L_adv the summed cross-entropy on PGD examples of the calibration set;
- ``random``: uniform scores, drawn anew at every pruning step.

The threshold search bisects on the number k of removed channels, measuring each candidate
on the actually pruned model. It is not ``allocation.solve``'s search: that one searches a
continuous lambda by regula falsi, this one an integer count, and each is the simple
bracketing search of its own variable.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from . import allocation
from . import data as data_mod
from . import groups as groups_mod
from .config import Params
from .devices import Runtime
from .errors import MrpfError
from .latency import budget_counts
from .objectives import probe_adversary
from .sensitivity import seeded_scope


def mean_magnitude(model, group) -> torch.Tensor:
    """Mean |w| per channel over the group's out-channel weights and biases (global_magnitude)."""
    params = groups_mod.out_channel_params(model, group)
    total = sum(p.detach().abs().flatten(1).sum(1) if p.dim() > 1 else p.detach().abs() for p in params)
    size = sum(p[0].numel() for p in params)
    return total / size


def taylor_adv(model, found, calibration: data_mod.ImageSet, params: Params, runtime: Runtime) -> list[torch.Tensor]:
    """|sum_c w_c dL_adv/dw_c| per channel (Molchanov et al., 2019), L_adv = summed CE on PGD
    examples of the calibration set; torch's global random state is left as it was."""
    if len(calibration) == 0:
        raise MrpfError("taylor_adv needs calibration images: data.calibration_size must be positive")
    with seeded_scope(runtime.device):
        return _taylor_scores(model, found, calibration, params, runtime)


def _taylor_scores(model, found, calibration, params: Params, runtime: Runtime) -> list[torch.Tensor]:
    adversary = probe_adversary(params)
    model.eval()
    for p in model.parameters():
        p.grad = None
    for i, (x, y) in enumerate(data_mod.Batches(calibration, params.mrs.batch_size, runtime.device,
                                                channels_last=runtime.channels_last)):
        torch.manual_seed(params.seed + i)
        x_adv = adversary.attack(model, x, y)
        F.cross_entropy(model(x_adv), y, reduction="sum").backward()
    scores = []
    for group in found:
        total = 0
        for p in groups_mod.out_channel_params(model, group):
            total = total + (p.detach() * p.grad).flatten(1).sum(1) if p.dim() > 1 else total + p.detach() * p.grad
        scores.append(total.abs())
    for p in model.parameters():
        p.grad = None
    return scores


def random_scores(found, seed: int, step: int) -> list[torch.Tensor]:
    """The ``random`` baseline's channel scores: uniform, drawn anew at every pruning step."""
    gen = torch.Generator().manual_seed(seed * 1_000 + step)
    return [torch.rand(g.channels, generator=gen) for g in found]


def scores_for(method: str, model, found, calibration, params: Params, runtime: Runtime,
               step: int) -> list[torch.Tensor]:
    """Every channel's score under a global-threshold ``method`` (lower goes first)."""
    if method == "global_magnitude":
        return [mean_magnitude(model, g) for g in found]
    if method == "taylor_adv":
        return taylor_adv(model, found, calibration, params, runtime)
    return random_scores(found, params.seed, step)


def global_plan(model, found, scores, budget, metric, caps, input_size, num_classes, dense,
                round_to: int = 1, table=None) -> tuple[dict, float]:
    """The k globally lowest-scored channels (at most ``caps[g]`` of group g: the one r_max cap,
    ``allocation.removal_cap``) reaching the budget, each group's count then adjusted by
    ``allocation.rounded_removal``; returns {group id: channels to remove} and the reduction.
    ``table``: the latency table, for ``metric`` latency."""
    ranked = sorted((float(s), g.id, c) for g, sc in zip(found, scores) for c, s in enumerate(sc.tolist()))
    by_score = {g.id: [] for g in found}       # each group's channels, lowest score first
    for _, gid, c in ranked:
        by_score[gid].append(c)
    channels = {g.id: g.channels for g in found}
    cap = {g.id: c for g, c in zip(found, caps)}

    def plan(k):
        counts = {g.id: 0 for g in found}
        for _, gid, _ in ranked[:k]:
            counts[gid] = min(counts[gid] + 1, cap[gid])
        return {gid: by_score[gid][:allocation.rounded_removal(channels[gid], n, round_to, cap[gid])]
                for gid, n in counts.items()}

    def achieved(k):
        pruned = copy.deepcopy(model)
        graph, pg = groups_mod.find_groups(pruned, input_size, num_classes)
        groups_mod.prune(graph, pg, plan(k))
        return 1 - budget_counts(pruned, input_size, table)[metric] / dense[metric]

    lo, hi = 0, len(ranked)
    if achieved(hi) < budget:
        raise MrpfError(f"a {budget:.0%} {metric} reduction is out of reach within the r_max cap of each group")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if achieved(mid) >= budget:
            hi = mid
        else:
            lo = mid
    return plan(hi), achieved(hi)
