"""Adversarial attacks in pixel space ([0, 1] inputs; the model normalises inside).

- ``fgsm``: Fast Gradient Sign Method (Goodfellow et al., 2015), L-inf or L2 (normalised step).
- ``pgd``: Projected Gradient Descent (Madry et al., 2018), L-inf or L2, on the
  cross-entropy loss or the CW margin loss (Carlini & Wagner, 2017: max_{j!=y} z_j - z_y;
  "CW-L-inf" is PGD on this loss), random start, restarts (worst case per image).
- ``trades_adversary``: the TRADES inner maximisation (Zhang et al., 2019) of
  KL(p(x) || p(x')) from x + 0.001 N(0, I).
- ``autoattack``: AutoAttack "standard" (Croce & Hein, 2020: APGD-CE, APGD-T, FAB-T,
  Square) from ``pyautoattack``, the reference implementation packaged for PyPI. We do
  not use torchattacks' copy, although it is faster: torchattacks
  pins ``requests~=2.25.1``, which downgrades urllib3/idna and forces an old dulwich
  beside DVC. Rewriting AutoAttack by hand would lose the reference's guarantees.

Shapes: ``x`` is (N, C, H, W) in [0, 1], ``y`` is (N,) int64; each function returns
adversarial images of x's shape. Every attack runs the model in eval mode with its
parameters' ``requires_grad`` off, and restores mode, flags and ``.grad`` afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .folding import folded


@contextlib.contextmanager
def attack_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and frozen parameters for the attack; everything restored on exit.

    Freezing parameters both protects their ``.grad`` and spares the backward pass the
    weight gradients, which an attack never needs. Yields the network to attack: the
    model with its BatchNorms folded into the convolutions (mrpf/folding.py; same logits,
    fewer ops), or the model itself where nothing folds.
    """
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield folded(model)
    finally:
        for m, training in modes:
            m.training = training
        for p, flag, grad in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CW margin per example: max_{j != y} z_j - z_y (positive means misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return others.max(1).values - true


def _per_example_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name == "ce":
        return lambda logits, y: F.cross_entropy(logits, y, reduction="none")
    if name == "cw":
        return margin_loss
    raise ValueError(f"unknown attack loss {name!r} (ce or cw)")


def _l2_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _l2_norm(delta)).clamp(max=1.0)


def _gaussian_like(x: torch.Tensor) -> torch.Tensor:
    """Standard normal noise in x's shape and memory layout. Drawn in NCHW order, then laid
    out like x: ``randn_like`` on a channels_last batch is several times slower on the CPU
    (docs/performance.md, ``python -m bench.op_costs``)."""
    layout = torch.channels_last if x.dim() == 4 and not x.is_contiguous() \
        and x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return torch.randn(x.shape, dtype=x.dtype, device=x.device).contiguous(memory_format=layout)


def _random_start(x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return torch.empty_like(x).uniform_(-eps, eps)
    direction = _gaussian_like(x)
    radius = torch.rand(x.shape[0], device=x.device).view(-1, 1, 1, 1) * eps
    return direction / _l2_norm(direction) * radius


def _ascend(model: nn.Module, x: torch.Tensor, delta: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor],
            eps: float, step_size: float, steps: int, norm: str) -> torch.Tensor:
    """Projected gradient ascent on ``objective(logits)`` (a per-example loss) from ``delta``."""
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = objective(model(x + delta)).sum()
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            if norm == "linf":
                step = step_size * grad.sign()
            else:
                step = step_size * grad / _l2_norm(grad)
            delta = _project(delta + step, eps, norm)
            delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float, steps: int,
        norm: str = "linf", loss: str = "ce", random_start: bool = True, restarts: int = 1) -> torch.Tensor:
    """PGD (Madry et al., 2018); with several restarts, each image keeps a restart that fools the model.

    Args:
        eps: radius of the L-inf or L2 ball, in pixel units ([0, 1] scale).
        step_size: L-inf: per-step sign step; L2: per-step L2 length.
        steps: number of gradient steps (0 returns the random start, or x).
        loss: "ce" (cross-entropy) or "cw" (margin max_{j!=y} z_j - z_y).
        restarts: independent random starts; the first one that misclassifies wins.
    """
    per_example = _per_example_loss(loss)
    with attack_mode(model) as net:
        def attack_once() -> torch.Tensor:
            start = _random_start(x, eps, norm) if random_start else torch.zeros_like(x)
            return _ascend(net, x, start, lambda logits: per_example(logits, y), eps, step_size, steps, norm)

        if restarts == 1:  # nothing to select: no extra forward pass, no host sync (CUDA graphs need none)
            return attack_once()
        best = x.clone()
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(restarts):
            x_adv = attack_once()
            with torch.no_grad():
                wrong = net(x_adv).argmax(1) != y
            take = wrong & ~fooled
            best[take] = x_adv[take]
            fooled |= wrong
            if bool(fooled.all()):
                break
        return best


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf") -> torch.Tensor:
    """FGSM (Goodfellow et al., 2015): one gradient step to the radius eps, no random start.

    L-inf: eps * sign(grad); L2: the fast gradient method's eps * grad / ||grad||_2 (the
    same paper's L2 variant), so the step ends on the sphere of the threat model.
    """
    return pgd(model, x, y, eps=eps, step_size=eps, steps=1, norm=norm, loss="ce", random_start=False)


def trades_adversary(model: nn.Module, x: torch.Tensor, *, eps: float, step_size: float, steps: int,
                     norm: str = "linf", target: torch.Tensor | None = None) -> torch.Tensor:
    """TRADES inner maximisation (Zhang et al., 2019): argmax KL(p(x) || p(x')) over the eps-ball.
    With ``target`` (class probabilities, e.g. a teacher's on x: RSLAD, Zi et al. 2021) the
    divergence is from those instead of the model's own clean prediction."""
    with attack_mode(model) as net:
        if target is None:
            with torch.no_grad():
                target = F.softmax(net(x), dim=1)
        p_clean = target
        objective = lambda logits: F.kl_div(F.log_softmax(logits, 1), p_clean, reduction="none").sum(1)  # noqa: E731
        return _ascend(net, x, 0.001 * _gaussian_like(x), objective, eps, step_size, steps, norm)


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
               batch_size: int = 500, seed: int = 0) -> torch.Tensor:
    """AutoAttack "standard" (Croce & Hein, 2020); returns a bool tensor: image still classified right."""
    from pyautoattack import AutoAttack

    with attack_mode(model) as net, torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        adversary = AutoAttack(net, norm="Linf" if norm == "linf" else "L2", eps=eps, version="standard",
                               device=x.device, seed=seed)
        adversary.verbose = False
        _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    return (y_adv == y).cpu()
