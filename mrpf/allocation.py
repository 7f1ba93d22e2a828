"""Budget allocation: per-group pruning ratios from MRS under a global MACs, parameter or latency budget.

DESIGN / docs/method.md: minimise sum_g MRS_g^alpha (r_g / rho)^2 subject to the achieved
reduction = S, 0 <= r_g <= r_max. The optimum has the form

    r_g = min(r_max, lambda * w_g / MRS_g^alpha),

w_g the group's share of the budget metric (``cost_aware``) or 1. Over the iterative
steps r_max holds against the group's *dense* width (``removal_cap``), the same cap as the
global-threshold baselines use. lambda is found by
bisection on the reduction *measured on the actually pruned model* (Torch-Pruning's
counter), so coupling between groups cannot make the budget miss. ("Bisection" in the design;
regula falsi here, which brackets the same way and needs fewer pruned models.)

``prune.allocation: loss_curve`` replaces the rule by the measured robust-loss curves
(``LossCurve``): for each lambda every group takes the ratio minimising
increase_g(r) - lambda * w_g * r, the Lagrangian of a separable resource allocation
(minimise the summed predicted increase subject to the budget; Everett, 1963), found by
the same search on the measured reduction.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from . import groups as groups_mod
from .config import BUDGET_METRICS
from .errors import MrpfError
from .latency import LatencyTable, budget_counts


def layer_output_shapes(model: nn.Module, input_size: int) -> dict[nn.Module, tuple]:
    """The output shape of every conv and linear layer on one input of ``input_size``, in call order."""
    shapes: dict[nn.Module, tuple] = {}
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.__setitem__(m, tuple(o.shape)))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, input_size, input_size, device=next(model.parameters()).device))
    model.train(was_training)
    for h in hooks:
        h.remove()
    return shapes


def group_costs(model: nn.Module, groups: list[groups_mod.Group], input_size: int, metric: str) -> list[float]:
    """Per-channel cost of each group in the budget metric, from layer shapes (an estimate that
    only shapes the allocation; the budget itself is met on measured counts). Latency is
    estimated by MACs here; the budget search then meets it on the latency table."""
    shapes = layer_output_shapes(model, input_size)
    costs = []
    for group in groups:
        total = 0.0
        for dep, _ in group.tp_group:
            m = dep.target.module
            if m not in shapes:
                continue
            spatial = math.prod(shapes[m][2:]) if isinstance(m, nn.Conv2d) else math.prod(shapes[m][1:-1]) or 1
            is_out = group.tp_group._DG.is_out_channel_pruning_fn(dep.handler)
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1]
                fan = (m.in_channels // m.groups) if is_out else (m.out_channels // m.groups)
                if m.groups > 1 and not is_out:
                    continue  # depthwise: counted once, with its output channels
                per = fan * k
            else:
                per = m.in_features if is_out else m.out_features
            total += per * (1 if metric == "params" else spatial)
        costs.append(max(total, 1.0))
    return costs


def ratios_for(lam: float, mrs: list[float], weights: list[float], alpha: float,
               r_caps: list[float]) -> list[float]:
    """r_g = min(cap_g, lambda * w_g / MRS_g^alpha): the allocation rule before rounding to channels."""
    return [min(cap, lam * w / (s ** alpha)) for s, w, cap in zip(mrs, weights, r_caps)]


class LossCurve:
    """A group's relative robust-loss increase as a function of the fraction r of its channels
    removed, fitted to probes at ratios rho_k: the lower convex envelope of (0, 0) and the
    probes (piecewise linear, non-decreasing), extended beyond the last probe with the last
    segment's slope. Convex, because the Lagrangian search can only reach the allocations of
    the convexified problem: on a concave stretch a group would jump from keeping all to
    losing most at one lambda, and the budget could be missed."""

    def __init__(self, ratios: list[float], increases: list[float]):
        points = [(0.0, 0.0)] + [(float(r), max(0.0, float(v))) for r, v in zip(ratios, increases)]
        hull: list[tuple[float, float]] = []
        for point in points:   # Andrew's monotone chain, lower half
            while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (point[1] - hull[-2][1])
                                      - (hull[-1][1] - hull[-2][1]) * (point[0] - hull[-2][0])) <= 0:
                hull.pop()
            hull.append(point)
        if len(hull) == 1:
            hull.append((points[-1][0], 0.0))
        self.r, self.y = [p[0] for p in hull], [p[1] for p in hull]

    def __call__(self, r: float) -> float:
        if r >= self.r[-1]:
            slope = (self.y[-1] - self.y[-2]) / (self.r[-1] - self.r[-2])
            return self.y[-1] + slope * (r - self.r[-1])
        for k in range(1, len(self.r)):
            if r <= self.r[k]:
                t = (r - self.r[k - 1]) / (self.r[k] - self.r[k - 1])
                return self.y[k - 1] + t * (self.y[k] - self.y[k - 1])
        return self.y[-1]

    def max_slope(self) -> float:
        return max((self.y[k] - self.y[k - 1]) / (self.r[k] - self.r[k - 1]) for k in range(1, len(self.r)))


CURVE_GRID = 200   # candidate ratios per group for the loss-curve rule: steps of r_cap / 200


def curve_smoothing(curves: list[LossCurve]) -> float:
    """Weight of the r^2 term that makes each group's minimiser unique and move with lambda:
    linear stretches of the curves would otherwise send every group with the same slope from 0
    to its cap at one lambda, and no lambda would meet the budget. 1 % of the mean increase at
    the last probe: small against the measured differences."""
    return 0.01 * max(sum(c.y[-1] for c in curves) / len(curves), 1e-9)


def curve_ratios_for(lam: float, curves: list[LossCurve], weights: list[float], r_caps: list[float]) -> list[float]:
    """Each group's r in [0, cap] minimising increase_g(r) + s r^2 - lambda * w_g * r
    (s: ``curve_smoothing``; on a grid of CURVE_GRID steps, smallest r on ties)."""
    smooth = curve_smoothing(curves)
    ratios = []
    for curve, w, cap in zip(curves, weights, r_caps):
        candidates = [cap * k / CURVE_GRID for k in range(CURVE_GRID + 1)]
        ratios.append(min(candidates, key=lambda r: (curve(r) + smooth * r * r - lam * w * r, r)))
    return ratios


def removal_cap(channels: int, dense_channels: int, r_max: float) -> int:
    """Most channels a group of ``channels`` may still lose so that, over all pruning steps,
    it loses at most floor(r_max * dense_channels) of its dense width and keeps one channel.
    The one cap of every method (allocation and global thresholds)."""
    keep = max(1, dense_channels - math.floor(r_max * dense_channels + 1e-9))
    return max(0, channels - keep)


def rounded_removal(channels: int, n: int, round_to: int, cap: int | None = None) -> int:
    """Channels to remove so that the kept ones are a multiple of ``round_to`` (the nearest
    multiple, at least one, rounded up where the nearest would remove more than ``cap``),
    for a group that loses any; unchanged for ``round_to`` 1, for groups narrower than
    ``round_to``, for groups left whole, and where no multiple fits under the cap. GPUs run
    convolutions with odd channel counts on slower kernels (docs/performance.md)."""
    cap = channels - 1 if cap is None else cap
    n = min(n, cap)
    if round_to <= 1 or n <= 0 or channels < round_to:
        return n
    kept = max(round_to, min(channels, round_to * round((channels - n) / round_to)))
    if channels - kept > cap:
        kept = round_to * math.ceil((channels - cap) / round_to)
        if kept >= channels:
            return n
    return channels - kept


def prune_copy(model: nn.Module, input_size: int, num_classes: int, ratios: list[float],
               round_to: int = 1, caps: list[int] | None = None) -> tuple[nn.Module, list]:
    """A pruned deep copy (see ``apply_ratios``) and its pruning history."""
    pruned = copy.deepcopy(model)
    return pruned, apply_ratios(pruned, input_size, num_classes, ratios, round_to, caps)


def removal_count(channels: int, ratio: float, round_to: int, cap: int) -> int:
    """Channels a group of ``channels`` loses at ratio r: round(r * channels), at most ``cap``,
    adjusted by ``rounded_removal`` (what ``apply_ratios`` removes, and HYDRA's masks drop)."""
    return rounded_removal(channels, int(round(ratio * channels)), round_to, cap)


def apply_ratios(pruned: nn.Module, input_size: int, num_classes: int, ratios: list[float],
                 round_to: int = 1, caps: list[int] | None = None,
                 scores: list[torch.Tensor] | None = None) -> list:
    """Prune in place: each group loses ``removal_count`` channels (``caps[g]`` at most; default:
    all but one), the smallest-magnitude ones, or the lowest-scored ones where ``scores`` (one
    tensor per group: HYDRA's and HARP's learned scores) are given."""
    graph, found = groups_mod.find_groups(pruned, input_size, num_classes)
    if len(found) != len(ratios):
        raise MrpfError(f"{len(ratios)} ratios for {len(found)} groups")
    caps = caps or [g.channels - 1 for g in found]
    remove = {}
    for group, r, cap in zip(found, ratios, caps):
        n = removal_count(group.channels, r, round_to, cap)
        if n > 0:
            order = (torch.argsort(groups_mod.channel_magnitude(pruned, group)) if scores is None
                     else torch.argsort(scores[group.id].detach().cpu(), stable=True))
            remove[group.id] = order[:n].tolist()
    return groups_mod.prune(graph, found, remove)


def check_reachable(model: nn.Module, input_size: int, num_classes: int, budget: float, metric: str,
                    r_max: float, dense: dict | None = None, round_to: int = 1,
                    table: LatencyTable | None = None) -> float:
    """Fail fast (before any MRS or fine-tuning) when pruning every group to ``r_max``
    cannot remove ``budget`` of the dense ``metric``; return that largest reduction.
    ``table``: the latency table, for ``metric`` latency."""
    dense = dense or budget_counts(model, input_size, table)
    graph, found = groups_mod.find_groups(model, input_size, num_classes)
    caps = [removal_cap(g.channels, g.channels, r_max) for g in found]
    pruned, _ = prune_copy(model, input_size, num_classes, [r_max] * len(found), round_to, caps)
    most = 1 - budget_counts(pruned, input_size, table)[metric] / dense[metric]
    if most < budget:
        raise MrpfError(f"a {budget:.0%} {metric} reduction is out of reach: pruning every group to "
                        f"r_max={r_max} removes {most:.1%}")
    return most


def solve(model: nn.Module, groups: list[groups_mod.Group], mrs: list[float], *, input_size: int, num_classes: int,
          budget: float, metric: str = "macs", alpha: float = 1.0, r_max: float = 0.9, cost_aware: bool = True,
          dense: dict | None = None, iterations: int = 30, round_to: int = 1,
          dense_channels: list[int] | None = None, curves: list[LossCurve] | None = None,
          table: LatencyTable | None = None, strength: float = 1.0) -> dict:
    """Per-group ratios whose pruned model removes ``budget`` of the dense model's ``metric``.

    ``dense``: counts of the reference model the budget is relative to (default: ``model``);
    ``dense_channels``: each group's dense width, against which ``r_max`` holds (default: now);
    ``curves``: one ``LossCurve`` per group for the loss-curve rule (then ``mrs`` and ``alpha``
    are not used); ``table``: the latency table, for ``metric`` latency; ``strength``: the rule
    raised to this power, r_g = min(cap_g, lambda (w_g / MRS_g^alpha)^strength), from uniform (0)
    to the paper's rule (1; ``prune.allocation: joint_search``).
    Returns ``{"ratios", "caps", "lambda", "achieved", "counts"}`` (``caps``: channels each group
    may lose, for ``apply_ratios``).
    """
    if not 0 < budget < 1:
        raise MrpfError(f"sparsity must lie in (0, 1), got {budget}")
    if metric not in BUDGET_METRICS:
        raise MrpfError(f"prune.metric: unknown metric {metric!r} ({', '.join(BUDGET_METRICS)})")
    if metric == "latency" and table is None:
        raise MrpfError("prune.metric latency needs a latency table (mrpf.latency.table_for)")
    dense = dense or budget_counts(model, input_size, table)
    costs = group_costs(model, groups, input_size, metric)
    total = sum(c * g.channels for c, g in zip(costs, groups))
    weights = [c * g.channels / total for c, g in zip(costs, groups)] if cost_aware else [1.0] * len(groups)
    mrs = [max(float(s), 1e-12) for s in mrs]
    weights, alpha = [w ** strength for w in weights], alpha * strength
    dense_channels = dense_channels or [g.channels for g in groups]
    caps = [removal_cap(g.channels, d, r_max) for g, d in zip(groups, dense_channels)]
    r_caps = [cap / g.channels for cap, g in zip(caps, groups)]

    def rule(lam: float) -> list[float]:
        if curves is not None:
            return curve_ratios_for(lam, curves, weights, r_caps)
        return ratios_for(lam, mrs, weights, alpha, r_caps)

    def achieved(lam: float) -> tuple[float, list[float], dict]:
        ratios = rule(lam)
        pruned, _ = prune_copy(model, input_size, num_classes, ratios, round_to, caps)
        counts = budget_counts(pruned, input_size, table)
        return 1 - counts[metric] / dense[metric], ratios, counts

    if curves is None:   # the smallest lambda at which every group reaches its cap
        hi = max(c * s ** alpha / w for s, w, c in zip(mrs, weights, r_caps))
    else:                # ... where removing more never raises the group's Lagrangian
        smooth = curve_smoothing(curves)
        hi = max((curve.max_slope() + 2 * smooth * c) / w for curve, w, c in zip(curves, weights, r_caps)) * 1.01
    best = achieved(hi)
    if best[0] < budget:
        raise MrpfError(f"a {budget:.0%} {metric} reduction is out of reach: pruning every group to "
                        f"r_max={r_max} removes {best[0]:.1%}")
    # Regula falsi (Illinois variant) on the measured reduction, which rises with lambda:
    # a few pruned-and-counted models instead of a full bisection.
    lo, f_lo, f_hi = 0.0, -budget, best[0] - budget
    side = 0
    for _ in range(iterations):
        if abs(best[0] - budget) < 0.002:
            break
        mid = (lo * f_hi - hi * f_lo) / (f_hi - f_lo) if f_hi != f_lo else (lo + hi) / 2
        if not lo < mid < hi:
            mid = (lo + hi) / 2
        result = achieved(mid)
        f_mid = result[0] - budget
        if f_mid >= 0:
            hi, f_hi, best = mid, f_mid, result
            f_lo = f_lo / 2 if side == 1 else f_lo
            side = 1
        else:
            lo, f_lo = mid, f_mid
            f_hi = f_hi / 2 if side == -1 else f_hi
            side = -1
        if hi - lo < 1e-9 * max(hi, 1e-12):
            break
    return {"ratios": best[1], "caps": caps, "lambda": hi, "achieved": best[0], "counts": best[2]}
