"""BatchNorm folding for the attack passes (mrpf/folding.py): same logits, same input
gradients, same attacks, always the current weights."""

import pytest
import torch
import torch.nn as nn

from mrpf import attacks, groups
from mrpf.folding import folded
from mrpf.models import build_model


def ready(arch: str, seed: int = 0) -> nn.Module:
    """A model whose BN layers hold non-trivial running statistics and affine parameters, in eval mode."""
    torch.manual_seed(seed)
    model = build_model(arch, 10, 32).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, 3, 32, 32) * 2)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def logits_and_input_grad(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = net(x)
    (grad,) = torch.autograd.grad(out.logsumexp(1).sum(), x)
    return out.detach(), grad


def batch_norms_called(net: nn.Module) -> int:
    modules = dict(net.named_modules())
    return sum(1 for node in net.graph.nodes
               if node.op == "call_module" and isinstance(modules[node.target], nn.BatchNorm2d))


@pytest.mark.parametrize("arch", ["vgg11_w8", "resnet18_w8"])
def test_folded_network_matches_the_model(arch):
    model = ready(arch)
    net = folded(model)
    assert net is not model and batch_norms_called(net) == 0
    x = torch.rand(8, 3, 32, 32)
    out, grad = logits_and_input_grad(model, x)
    out_f, grad_f = logits_and_input_grad(net, x)
    assert torch.allclose(out, out_f, atol=1e-5, rtol=1e-4)
    assert torch.allclose(grad, grad_f, atol=1e-7, rtol=1e-3)


def test_folded_network_follows_weight_updates_masks_and_pruning():
    model = ready("vgg11_w8")
    x = torch.rand(4, 3, 32, 32)
    folded(model)                                   # build and cache
    with torch.no_grad():                           # an optimiser step: weights and BN statistics move
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(0.1)
    assert torch.allclose(folded(model)(x), model(x), atol=1e-5, rtol=1e-4)
    _, found = groups.find_groups(model, 32, 10)
    with groups.masked(model, found[0], torch.arange(3)):          # the MRS probe zeroes channels in place
        assert torch.allclose(folded(model)(x), model(x), atol=1e-5, rtol=1e-4)
    graph, found = groups.find_groups(model, 32, 10)
    groups.prune(graph, found, {found[0].id: [0, 1], found[1].id: [5]})   # in place: shapes change
    assert torch.allclose(folded(model)(x), model(x), atol=1e-5, rtol=1e-4)


def test_folded_attack_equals_the_unfolded_attack(monkeypatch):
    model = ready("resnet18_w8")
    x, y = torch.rand(16, 3, 32, 32), torch.arange(16) % 10
    torch.manual_seed(1)
    with_folding = attacks.pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=3)
    monkeypatch.setenv("MRPF_FOLD_BN", "0")
    assert folded(model) is model
    torch.manual_seed(1)
    without = attacks.pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=3)
    # sign steps agree except where a gradient component is within rounding of zero
    assert (with_folding - without).abs().gt(1e-6).float().mean() < 0.01


def test_models_without_foldable_pairs_or_fx_support_run_unfolded():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 10)).eval()
    assert folded(plain) is plain
    mobilevit = build_model("mobilevit_xs", 10, 32).eval()     # timm model: FX cannot trace it
    assert folded(mobilevit) is mobilevit
    x = torch.rand(2, 3, 32, 32)
    x_adv = attacks.pgd(mobilevit, x, torch.tensor([0, 1]), eps=8 / 255, step_size=2 / 255, steps=1)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
