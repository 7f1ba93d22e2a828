"""Attack strength on a real adversarially trained model (../shared/data CIFAR-10 subset).

A weak attack makes every robustness number wrong, so these checks run on real data:
PGD accuracy falls monotonically with eps and reaches ~0 at 64/255; AutoAttack is not
weaker than PGD-20; our PGD-20 agrees with an independent implementation (APGD-CE of
the reference AutoAttack code) within 2 points on the same 1,000 test images.
"""

import pytest
import torch

from mrpf import attacks
from mrpf.config import load_params
from mrpf.data import fixed_subset, read_npz
from mrpf.devices import setup
from mrpf.models import load_model
from mrpf.training import train

pytestmark = [pytest.mark.slow, pytest.mark.realdata]
EPS = 8 / 255


@pytest.fixture(scope="module")
def robust_model(real_data, tmp_path_factory):
    """VGG-11/8 adversarially trained (PGD-3, 6 epochs, ~1 min) and 1,000 shuffled test images."""
    params = load_params(None, [f"data.train_path={real_data['train']}", "train.steps=3", "train.epochs=6",
                                "train.val_pgd_steps=0", "device.name=cpu"])
    run = tmp_path_factory.mktemp("robust")
    train(params, run, log=lambda m: None)
    model, _ = load_model(run / "checkpoint.pt", setup(params.device))
    test = fixed_subset(read_npz(real_data["test"]), 1000)
    return model, test.x.float() / 255, test.y


def accuracy(model, x, y, attack=None, batch=500):
    correct = 0
    for i in range(0, len(y), batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        if attack is not None:
            xb = attack(xb, yb)
        with torch.no_grad():
            correct += int((model(xb).argmax(1) == yb).sum())
    return correct / len(y)


def pgd20(model, eps):
    step = max(2 / 255, 2.5 * eps / 20)
    return lambda x, y: attacks.pgd(model, x, y, eps=eps, step_size=step, steps=20)


def test_model_is_robust_at_all(robust_model):
    model, x, y = robust_model
    torch.manual_seed(0)
    assert accuracy(model, x, y) > 0.3 and accuracy(model, x[:500], y[:500], pgd20(model, EPS)) > 0.15


def test_pgd_accuracy_falls_monotonically_to_zero(robust_model):
    model, x, y = robust_model
    x, y = x[:500], y[:500]
    torch.manual_seed(0)
    accs = [accuracy(model, x, y, pgd20(model, e / 255)) for e in (0, 2, 4, 8, 16, 32, 64)]
    assert all(a >= b for a, b in zip(accs, accs[1:])), accs
    assert accs[-1] <= 0.01, accs


def test_autoattack_is_not_weaker_than_pgd20(robust_model):
    model, x, y = robust_model
    x, y = x[:100], y[:100]
    torch.manual_seed(0)
    pgd_acc = accuracy(model, x, y, pgd20(model, EPS))
    aa_acc = attacks.autoattack(model, x, y, eps=EPS, batch_size=100).float().mean().item()
    assert aa_acc <= pgd_acc + 0.01, (aa_acc, pgd_acc)


def test_pgd20_agrees_with_reference_apgd_ce(robust_model):
    from pyautoattack.autopgd_base import APGDAttack

    model, x, y = robust_model
    torch.manual_seed(0)
    ours = accuracy(model, x, y, pgd20(model, EPS))
    apgd = APGDAttack(model, n_iter=100, norm="Linf", eps=EPS, loss="ce", n_restarts=1, seed=0, device="cpu")
    with attacks.attack_mode(model):
        reference = accuracy(model, x, y, lambda xb, yb: apgd.perturb(xb, yb))
    assert abs(ours - reference) <= 0.02, (ours, reference)
