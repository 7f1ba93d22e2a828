import pytest
import torch

from mrpf import allocation, groups
from mrpf.errors import MrpfError
from mrpf.models import build_model


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
    pruned, _ = allocation.prune_copy(model, 32, 10, out["ratios"])
    dense = allocation.count(model, 32)[metric]
    assert abs(1 - allocation.count(pruned, 32)[metric] / dense - budget) <= 0.01


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
