import pytest
import torch
import torch.nn.functional as F

from mrpf import attacks
from mrpf.config import DeviceParams
from mrpf.models import Classifier

EPS = 8 / 255


@pytest.fixture(scope="module")
def trained(tiny_data, trained_checkpoint):
    """The clean-trained small model (conftest) and a test batch."""
    from mrpf.data import read_npz
    from mrpf.devices import setup
    from mrpf.models import load_model

    model, _ = load_model(trained_checkpoint, setup(DeviceParams(name="cpu", channels_last=True, bf16=False)))
    test = read_npz(tiny_data["test"])
    return model, test.x[:100].float() / 255, test.y[:100]


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


ATTACKS = {
    "fgsm": lambda m, x, y: attacks.fgsm(m, x, y, eps=EPS),
    "pgd_linf_ce": lambda m, x, y: attacks.pgd(m, x, y, eps=EPS, step_size=2 / 255, steps=3),
    "pgd_linf_cw_restarts": lambda m, x, y: attacks.pgd(m, x, y, eps=EPS, step_size=2 / 255, steps=2, loss="cw",
                                                        restarts=2),
    "pgd_l2": lambda m, x, y: attacks.pgd(m, x, y, eps=0.5, step_size=0.1, steps=3, norm="l2"),
    "trades": lambda m, x, y: attacks.trades_adversary(m, x, eps=EPS, step_size=2 / 255, steps=2),
    "autoattack": lambda m, x, y: attacks.autoattack(m, x, y, eps=EPS, batch_size=8),
}


def small_net():
    """A tiny conv net with batch norm, so that even AutoAttack's 5,000 Square queries take seconds."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10))
    return Classifier(net, (0.5,) * 3, (0.25,) * 3)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_restores_mode_flags_and_grads(name):
    torch.manual_seed(0)
    model = small_net()
    model.train()
    model.net[5].eval()                               # a mixed mode must come back as it was
    params = list(model.parameters())
    params[0].requires_grad_(False)
    for p in params[1:]:
        p.grad = torch.full_like(p, 0.5)
    bn = model.net[1]
    running_mean = bn.running_mean.clone()
    modes = [m.training for m in model.modules()]
    x, y = torch.rand(8, 3, 8, 8), torch.arange(8) % 10
    ATTACKS[name](model, x, y)
    assert [m.training for m in model.modules()] == modes
    assert params[0].requires_grad is False and params[0].grad is None
    assert all(p.requires_grad for p in params[1:])
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in params[1:])
    assert torch.equal(bn.running_mean, running_mean)  # attacks run in eval mode: no BN statistics change


@pytest.mark.parametrize("norm, eps", [("linf", EPS), ("l2", 0.5)])
def test_pgd_stays_in_the_ball_and_the_image_range(trained, norm, eps):
    model, x, y = trained
    x_adv = attacks.pgd(model, x, y, eps=eps, step_size=eps / 4, steps=5, norm=norm)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_attacks_hurt_in_the_expected_order(trained):
    model, x, y = trained
    clean = accuracy(model, x, y)
    fgsm_acc = accuracy(model, attacks.fgsm(model, x, y, eps=EPS), y)
    pgd_acc = accuracy(model, attacks.pgd(model, x, y, eps=EPS, step_size=2 / 255, steps=10), y)
    assert clean > 0.8                        # the model learnt the generated data
    assert pgd_acc <= fgsm_acc <= clean
    assert pgd_acc < clean - 0.2              # a clean-trained model is not robust


def test_pgd_accuracy_falls_with_eps_to_zero(trained):
    model, x, y = trained
    accs = [accuracy(model, attacks.pgd(model, x, y, eps=e / 255, step_size=e / 255 / 4, steps=10), y)
            for e in (0, 2, 4, 8, 16, 32, 64)]
    assert all(a >= b for a, b in zip(accs, accs[1:])), accs
    assert accs[-1] <= 0.01


def test_margin_loss_is_best_other_minus_true():
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 0.0, 1.0]])
    assert attacks.margin_loss(logits, torch.tensor([1, 0])).tolist() == [-1.0, -4.0]


def test_restarts_keep_for_each_image_the_first_start_that_fools_it(trained):
    """restarts=3 equals three single-start runs drawn in sequence, per image the first that
    misclassifies (the image itself where none does)."""
    model, x, y = trained
    torch.manual_seed(1)
    three = attacks.pgd(model, x, y, eps=16 / 255, step_size=4 / 255, steps=2, restarts=3)
    torch.manual_seed(1)
    singles = [attacks.pgd(model, x, y, eps=16 / 255, step_size=4 / 255, steps=2) for _ in range(3)]
    with torch.no_grad():
        fooled = [model(s).argmax(1) != y for s in singles]
    expected = x.clone()
    taken = torch.zeros(len(x), dtype=torch.bool)
    for single, wrong in zip(singles, fooled):
        expected[wrong & ~taken] = single[wrong & ~taken]
        taken |= wrong
    assert taken.any() and not taken.all()          # some images fall to a restart, some to none
    assert sum(bool(w.any()) for w in fooled) >= 2
    assert torch.equal(three, expected)


class LinearNet(torch.nn.Module):
    """logits = W x + b on flattened pixels: input gradients by hand."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_one_pgd_step_matches_a_hand_computation(norm):
    torch.manual_seed(0)
    model = LinearNet()
    x = torch.rand(4, 3, 2, 2) * 0.6 + 0.2
    y = torch.tensor([0, 1, 2, 0])
    eps, step = (8 / 255, 2 / 255) if norm == "linf" else (0.5, 0.1)
    x_adv = attacks.pgd(model, x, y, eps=eps, step_size=step, steps=1, norm=norm, random_start=False)
    with torch.no_grad():   # d CE / d x = W^T (softmax(z) - onehot(y))
        z = model(x)
        grad = ((F.softmax(z, 1) - F.one_hot(y, 3).float()) @ model.fc.weight).view_as(x)
        if norm == "linf":
            expected = x + step * grad.sign()
        else:
            expected = x + step * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(x_adv, expected.clamp(0, 1), atol=1e-6)


def test_l2_fgsm_steps_to_the_l2_sphere_not_the_linf_corner():
    torch.manual_seed(0)
    model = LinearNet()
    x = torch.full((4, 3, 2, 2), 0.5)
    y = torch.tensor([0, 1, 2, 0])
    delta = attacks.fgsm(model, x, y, eps=0.3, norm="l2") - x
    assert torch.allclose(delta.flatten(1).norm(dim=1), torch.full((4,), 0.3), atol=1e-6)
    assert delta.abs().amax() < 0.3 - 1e-3             # an L-inf step would move every pixel by eps
    linf = attacks.fgsm(model, x, y, eps=8 / 255) - x
    assert torch.allclose(linf.abs(), torch.full_like(linf, 8 / 255), atol=1e-6)


def test_trades_adversary_raises_the_kl(trained):
    model, x, _ = trained
    x_adv = attacks.trades_adversary(model, x, eps=EPS, step_size=2 / 255, steps=5)
    with torch.no_grad():
        p = F.softmax(model(x), 1)
        kl = F.kl_div(F.log_softmax(model(x_adv), 1), p, reduction="batchmean").item()
        noise = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
        kl_noise = F.kl_div(F.log_softmax(model(noise), 1), p, reduction="batchmean").item()
    assert kl > 10 * max(kl_noise, 1e-6)
