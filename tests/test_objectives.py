"""The training losses equal the published formulas, computed here the long way."""

import math

import pytest
import torch

from mrpf.objectives import mart_loss, pgd_at_loss, rslad_loss, trades_loss


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen), torch.tensor([0, 1, 2, 3, 4, 0])


def softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_pgd_at_is_cross_entropy_on_adversarial_logits(batch):
    _, adv, y = batch
    expected = sum(-math.log(softmax(adv[i].tolist())[y[i]]) for i in range(6)) / 6
    assert pgd_at_loss(adv, y).item() == pytest.approx(expected, rel=1e-5)


def test_trades_formula(batch):
    # Zhang et al. 2019, eq. 5: CE(f(x), y) + beta * KL(p(x) || p(x')), averaged over the batch
    clean, adv, y = batch
    beta = 6.0
    total = 0.0
    for i in range(6):
        p, q = softmax(clean[i].tolist()), softmax(adv[i].tolist())
        total += -math.log(p[y[i]]) + beta * sum(pj * math.log(pj / qj) for pj, qj in zip(p, q))
    assert trades_loss(clean, adv, y, beta).item() == pytest.approx(total / 6, rel=1e-5)


def test_mart_formula(batch):
    # Wang et al. 2020, eq. 8: BCE(p(x'), y) + beta * KL(p(x) || p(x')) * (1 - p_y(x))
    clean, adv, y = batch
    beta = 5.0
    total = 0.0
    for i in range(6):
        p, q = softmax(clean[i].tolist()), softmax(adv[i].tolist())
        top_other = max(q[j] for j in range(5) if j != y[i])
        bce = -math.log(q[y[i]]) - math.log(1 - top_other)
        kl = sum(pj * math.log(pj / qj) for pj, qj in zip(p, q))
        total += bce + beta * kl * (1 - p[y[i]])
    assert mart_loss(clean, adv, y, beta).item() == pytest.approx(total / 6, rel=1e-3)


def test_trades_gradient_stays_finite_when_probabilities_underflow():
    clean = torch.tensor([[200.0, 0.0, -200.0], [0.0, 150.0, -150.0]], requires_grad=True)
    adv = torch.tensor([[100.0, 50.0, -100.0], [10.0, 100.0, -100.0]], requires_grad=True)
    trades_loss(clean, adv, torch.tensor([0, 1]), 6.0).backward()
    assert torch.isfinite(clean.grad).all() and torch.isfinite(adv.grad).all()


def test_rslad_formula(batch):
    # Zi et al. 2021: 5/6 KL(t(x) || s(x')) + 1/6 KL(t(x) || s(x)), t = the teacher's soft labels
    clean, adv, _ = batch
    teacher = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))

    def kl(p, q):
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))

    expected = sum(5 / 6 * kl(softmax(teacher[i].tolist()), softmax(adv[i].tolist()))
                   + 1 / 6 * kl(softmax(teacher[i].tolist()), softmax(clean[i].tolist())) for i in range(6)) / 6
    assert rslad_loss(clean, adv, teacher).item() == pytest.approx(expected, rel=1e-5)


def test_rslad_attack_diverges_from_the_teacher_and_needs_one():
    from mrpf.attacks import trades_adversary
    from mrpf.errors import MrpfError
    from mrpf.objectives import objective_for

    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(12, 4), torch.nn.Linear(12, 4)
    x = torch.rand(16, 12)
    target = torch.softmax(teacher(x), 1).detach()

    def divergence(inputs):
        return torch.nn.functional.kl_div(torch.log_softmax(student(inputs), 1), target, reduction="sum").item()

    x_adv = trades_adversary(student, x, eps=0.1, step_size=0.05, steps=5, target=target)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and divergence(x_adv) > divergence(x) + 1e-3
    with pytest.raises(MrpfError, match="rslad distils a pruned model from the dense one"):
        objective_for("rslad")
    loss, logits = objective_for("rslad", teacher)(student, x, None, _adversary(), 0.0)
    assert loss.requires_grad and logits.shape == (16, 4)
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training


def _adversary():
    from mrpf.objectives import Adversary

    return Adversary(eps=0.1, step_size=0.05, steps=2)
