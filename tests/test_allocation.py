import pytest
import torch

from mrpf import allocation, groups
from mrpf.errors import MrpfError
from mrpf.models import build_model, count_ops


def _setup(name, size=32):
    torch.manual_seed(0)
    model = build_model(name, 10, size).eval()
    _, found = groups.find_groups(model, size, 10)
    mrs = torch.rand(len(found), generator=torch.Generator().manual_seed(1)).add(0.05).tolist()
    return model, found, mrs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "vgg16", "mobilevit_xs"])   # full-size models
@pytest.mark.parametrize("metric", ["macs", "params"])
@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7, 0.9])
def test_budget_is_met_within_one_point(name, metric, budget):
    model, found, mrs = _setup(name)
    out = allocation.solve(model, found, mrs, input_size=32, num_classes=10, budget=budget, metric=metric,
                           r_max=0.95)
    assert abs(out["achieved"] - budget) <= 0.01, out["achieved"]
    assert max(out["ratios"]) <= 0.95 + 1e-9
    pruned, _ = allocation.prune_copy(model, 32, 10, out["ratios"], caps=out["caps"])
    dense = count_ops(model, 32)[metric]
    assert abs(1 - count_ops(pruned, 32)[metric] / dense - budget) <= 0.01


@pytest.mark.parametrize("name", ["vgg16_w4", "resnet18_w4"])
def test_budget_is_met_on_narrow_models(name):
    test_budget_is_met_within_one_point(name, "macs", 0.5)


def test_higher_mrs_never_gets_a_higher_ratio_without_cost_weights():
    model, found, mrs = _setup("vgg16_w4")
    out = allocation.solve(model, found, mrs, input_size=32, num_classes=10, budget=0.5, cost_aware=False)
    pairs = sorted(zip(mrs, out["ratios"]))
    assert all(r1 >= r2 - 1e-12 for (_, r1), (_, r2) in zip(pairs, pairs[1:]))


def test_alpha_zero_without_cost_weights_is_uniform():
    model, found, mrs = _setup("vgg16_w4")
    out = allocation.solve(model, found, mrs, input_size=32, num_classes=10, budget=0.5, alpha=0.0,
                           cost_aware=False)
    assert max(out["ratios"]) - min(out["ratios"]) < 1e-12


def test_unreachable_budget_is_a_clear_error():
    model, found, mrs = _setup("vgg11_w8")
    with pytest.raises(MrpfError, match="out of reach"):
        allocation.solve(model, found, mrs, input_size=32, num_classes=10, budget=0.9, r_max=0.2)
    with pytest.raises(MrpfError, match=r"sparsity must lie in \(0, 1\)"):
        allocation.solve(model, found, mrs, input_size=32, num_classes=10, budget=1.2)


@pytest.mark.parametrize("channels, n, round_to, expected", [
    (64, 21, 8, 24),    # keeps 43 -> 40
    (64, 18, 8, 16),    # keeps 46 -> 48
    (64, 0, 8, 0),      # a group left whole stays whole
    (64, 63, 8, 56),    # keeps at least round_to
    (6, 3, 8, 3),       # narrower than round_to: unchanged
    (64, 20, 1, 20),    # round_to 1: unchanged
])
def test_rounded_removal_keeps_multiples(channels, n, round_to, expected):
    assert allocation.rounded_removal(channels, n, round_to) == expected


@pytest.mark.parametrize("name", ["vgg16_w2", "resnet18_w2"])
def test_round_to_keeps_multiples_of_eight_and_meets_the_budget(name):
    model, found, mrs = _setup(name)
    out = allocation.solve(model, found, mrs, input_size=32, num_classes=10, budget=0.5, round_to=8)
    pruned, _ = allocation.prune_copy(model, 32, 10, out["ratios"], round_to=8, caps=out["caps"])
    _, kept = groups.find_groups(pruned, 32, 10)
    assert all(g.channels % 8 == 0 for g, dense in zip(kept, found) if dense.channels >= 8)
    assert any(g.channels != dense.channels for g, dense in zip(kept, found))
    achieved = 1 - count_ops(pruned, 32)["macs"] / count_ops(model, 32)["macs"]
    assert 0.5 <= achieved <= 0.53, achieved


def test_global_ranking_methods_round_too():
    from mrpf.scoring import global_plan

    model, found, _ = _setup("vgg16_w2")
    graph, found = groups.find_groups(model, 32, 10)
    scores = [groups.channel_magnitude(model, g) for g in found]
    dense = count_ops(model, 32)
    caps = [allocation.removal_cap(g.channels, g.channels, 0.9) for g in found]
    remove, achieved = global_plan(model, found, scores, 0.5, "macs", caps, 32, 10, dense, round_to=8)
    assert achieved >= 0.5
    assert all((g.channels - len(remove[g.id])) % 8 == 0 for g in found if remove[g.id])
    for g in found:   # the removed channels are the group's lowest-scored ones
        kept_scores = [s for c, s in enumerate(scores[found.index(g)].tolist()) if c not in remove[g.id]]
        removed_scores = [scores[found.index(g)][c].item() for c in remove[g.id]]
        assert not removed_scores or max(removed_scores) <= min(kept_scores)


@pytest.mark.parametrize("channels, dense, r_max, expected", [
    (64, 64, 0.5, 32),     # first step: half the dense width
    (40, 64, 0.5, 8),      # a later step: 24 already gone, 8 more reach the dense cap of 32
    (32, 64, 0.5, 0),      # the cap is reached: nothing more, whatever the step's ratio
    (15, 15, 0.9, 13),     # floor(0.9 * 15) = 13, not round(13.5) = 14
    (10, 10, 1.0, 9),      # one channel always stays
])
def test_removal_cap_holds_r_max_against_the_dense_width(channels, dense, r_max, expected):
    assert allocation.removal_cap(channels, dense, r_max) == expected


@pytest.mark.parametrize("channels, n, round_to, cap, expected", [
    (64, 21, 8, 20, 16),   # nearest multiple would remove 24 > cap: rounded up to keep 48
    (64, 30, 8, 30, 24),   # nearest keeps 32 (removes 32 > 30): keeps 40
    (20, 5, 8, 3, 3),      # no multiple of 8 fits under the cap: the cap, unrounded
])
def test_rounded_removal_never_passes_the_cap(channels, n, round_to, cap, expected):
    assert allocation.rounded_removal(channels, n, round_to, cap) == expected


def test_allocation_and_global_thresholds_share_the_cap():
    """A group every method would empty loses exactly removal_cap channels, by either path."""
    from mrpf.scoring import global_plan

    model, found, mrs = _setup("vgg16_w4")
    dense = count_ops(model, 32)
    caps = [allocation.removal_cap(g.channels, g.channels, 0.3) for g in found]
    target = 2
    scores = [torch.full((g.channels,), 1.0 if g.id != target else 0.0) + torch.rand(g.channels) * 1e-3
              for g in found]
    remove, _ = global_plan(model, found, scores, 0.05, "macs", caps, 32, 10, dense)
    assert len(remove[target]) == caps[target] == int(0.3 * found[target].channels)
    low = [100.0 if g.id != target else 1e-6 for g in found]     # the allocation sends it to its cap
    out = allocation.solve(model, found, low, input_size=32, num_classes=10, budget=0.05, r_max=0.3,
                           cost_aware=False)
    pruned, _ = allocation.prune_copy(model, 32, 10, out["ratios"], caps=out["caps"])
    _, kept = groups.find_groups(pruned, 32, 10)
    assert found[target].channels - kept[target].channels == caps[target]


def test_cost_aware_ratios_follow_weight_over_mrs_to_the_alpha_before_the_cap():
    model, found, _ = _setup("vgg16_w4")
    mrs = [0.5 + 0.1 * i for i in range(len(found))]
    out = allocation.solve(model, found, mrs, input_size=32, num_classes=10, budget=0.3, alpha=1.5, r_max=0.9)
    costs = allocation.group_costs(model, found, 32, "macs")
    total = sum(c * g.channels for c, g in zip(costs, found))
    expected = [out["lambda"] * (c * g.channels / total) / s ** 1.5 for c, g, s in zip(costs, found, mrs)]
    uncapped = [(r, e) for r, e, g in zip(out["ratios"], expected, found)
                if e < 0.99 * int(0.9 * g.channels) / g.channels]
    assert len(uncapped) >= 3
    assert all(r == pytest.approx(e, rel=1e-9) for r, e in uncapped)
    assert all(r <= int(0.9 * g.channels) / g.channels + 1e-12 for r, g in zip(out["ratios"], found))


def test_loss_curve_is_the_convex_envelope_of_the_probes_extended_by_the_last_slope():
    curve = allocation.LossCurve([0.25, 0.5, 0.75], [0.1, 0.05, 0.4])    # a noisy bump at 0.25
    assert curve.r == [0.0, 0.5, 0.75] and curve.y == [0.0, 0.05, 0.4]   # (0.25, 0.1) lies above the envelope
    assert curve(0.25) == pytest.approx(0.025) and curve(0.625) == pytest.approx(0.225)
    assert curve(0.9) == pytest.approx(0.4 + 1.4 * 0.15)                 # last slope, 1.4 per unit
    assert curve.max_slope() == pytest.approx(1.4)
    concave = allocation.LossCurve([0.25, 0.5, 0.75], [0.5, 0.55, 0.6])   # steep, then flat: the chord
    assert curve.max_slope() > 0 and concave(0.25) == pytest.approx(0.2) and concave.r == [0.0, 0.75]
    assert allocation.LossCurve([0.5], [-0.01])(0.9) == 0.0              # no increase measured


def test_loss_curve_rule_minimises_each_groups_lagrangian():
    curves = [allocation.LossCurve([0.25, 0.5, 0.75], [0.01, 0.05, 0.3]),   # convex: cheap first channels
              allocation.LossCurve([0.25, 0.5, 0.75], [0.2, 0.4, 0.6])]     # linear, slope 0.8
    weights, caps = [0.5, 0.5], [0.9, 0.9]
    s = allocation.curve_smoothing(curves)
    assert s == pytest.approx(0.01 * (0.3 + 0.6) / 2)
    for lam in (0.05, 0.3, 1.0, 3.0):
        ratios = allocation.curve_ratios_for(lam, curves, weights, caps)
        for curve, w, cap, r in zip(curves, weights, caps, ratios):
            grid = [cap * k / allocation.CURVE_GRID for k in range(allocation.CURVE_GRID + 1)]
            assert curve(r) + s * r * r - lam * w * r <= min(curve(g) + s * g * g - lam * w * g for g in grid) + 1e-12
    assert allocation.curve_ratios_for(1.0, curves, weights, caps)[1] == 0.0    # 0.8 > 1.0 * 0.5: keep whole
    assert allocation.curve_ratios_for(1.7, curves, weights, caps)[1] == 0.9    # 0.8 + 2 s 0.9 < 1.7 * 0.5: cap


def test_loss_curve_allocation_meets_the_budget_and_spares_the_steep_groups():
    model, found, mrs = _setup("vgg16_w4")
    steep = set(range(0, len(found), 2))
    curves = [allocation.LossCurve([0.25, 0.5, 0.75], [2.0, 4.0, 6.0] if g in steep else [0.01, 0.02, 0.05])
              for g in range(len(found))]
    out = allocation.solve(model, found, mrs, input_size=32, num_classes=10, budget=0.5, cost_aware=False,
                           curves=curves)
    assert abs(out["achieved"] - 0.5) <= 0.01
    assert max(out["ratios"][g] for g in steep) < min(r for g, r in enumerate(out["ratios"]) if g not in steep)


def test_strength_runs_from_uniform_to_the_papers_rule():
    """r_g ~ (w_g / MRS_g^alpha)^t (prune.allocation: joint_search): t = 0 is uniform pruning,
    t = 1 the inverse-MRS rule, and in between the ratios lie between the two."""
    model, found, mrs = _setup("vgg16_w4")
    solve = lambda **kw: allocation.solve(model, found, mrs, input_size=32, num_classes=10, budget=0.5, **kw)  # noqa: E731
    uniform = solve(alpha=0.0, cost_aware=False)["ratios"]
    assert solve(strength=0.0)["ratios"] == uniform and len(set(uniform)) == 1
    assert solve(strength=1.0)["ratios"] == solve()["ratios"]
    rule, half = solve()["ratios"], solve(strength=0.5)["ratios"]
    assert rule != uniform
    spread = lambda r: max(r) - min(r)  # noqa: E731
    assert 0 < spread(half) < spread(rule)
