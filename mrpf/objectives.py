"""Training objectives, chosen by name (``train.method``): clean, PGD-AT, TRADES, MART, and
for fine-tuning a pruned model (``prune.finetune_method``) also RSLAD, distillation from the
dense model.

The loss formulas are pure functions of logits (tested against the papers' formulas);
``training_loss`` adds the inner maximisation each method prescribes.

- PGD-AT (Madry et al., 2018): CE(f(x'), y), x' = PGD-k on CE.
- TRADES (Zhang et al., 2019): CE(f(x), y) + beta * KL(p(x) || p(x')), x' maximises the KL.
- MART (Wang et al., 2020): BCE(p(x'), y) + beta * KL(p(x) || p(x')) * (1 - p_y(x)),
  BCE = -log p_y(x') - log(1 - max_{k!=y} p_k(x')), x' = PGD-k on CE.
- RSLAD (Zi et al., ICCV 2021; robust soft-label adversarial distillation, after ARD,
  Goldblum et al., AAAI 2020): (5/6) KL(t(x) || p(x')) + (1/6) KL(t(x) || p(x)), t = the
  teacher's (the dense robust model's) soft labels on the clean input, x' maximising
  KL(t(x) || p(x')); no hard labels.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attacks import pgd, trades_adversary
from .config import DISTILLATION_METHODS, TRAIN_METHODS, Params, pgd_step_size
from .errors import MrpfError


@dataclasses.dataclass(frozen=True)
class Adversary:
    """A PGD adversary: the threat model (norm, eps) plus the schedule (steps, step size)."""

    eps: float
    step_size: float
    steps: int
    norm: str = "linf"

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, **options) -> torch.Tensor:
        """PGD on cross-entropy from a random start (``options``: loss, restarts; attacks.pgd)."""
        return pgd(model, x, y, eps=self.eps, step_size=self.step_size, steps=self.steps, norm=self.norm, **options)


def _adversary(params: Params, steps: int, step_size: float | None) -> Adversary:
    return Adversary(eps=params.attack.eps, step_size=pgd_step_size(params.attack, step_size, steps), steps=steps,
                     norm=params.attack.norm)


def training_adversary(params: Params) -> Adversary:
    """The attack of adversarial training: train.steps, train.step_size."""
    return _adversary(params, params.train.steps, params.train.step_size)


def validation_adversary(params: Params) -> Adversary:
    """The per-epoch validation attack: train.val_pgd_steps at evaluate.step_size."""
    return _adversary(params, params.train.val_pgd_steps, params.evaluate.step_size)


def evaluation_adversary(params: Params) -> Adversary:
    """PGD/CW of ``mrpf evaluate``: evaluate.pgd_steps at evaluate.step_size."""
    return _adversary(params, params.evaluate.pgd_steps, params.evaluate.step_size)


def probe_adversary(params: Params) -> Adversary:
    """The MRS probe's and adversarial Taylor's attack: mrs.steps at 2.5 * eps / steps."""
    return _adversary(params, params.mrs.steps, None)


def pgd_at_loss(logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_adv, y)


def trades_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    # KL in log space: with softmax(clean) as the target, a probability that underflows to 0
    # makes the target's gradient log(0) = -inf and the weights NaN (seen on a pruned model).
    kl = F.kl_div(F.log_softmax(logits_adv, 1), F.log_softmax(logits_clean, 1), reduction="batchmean",
                  log_target=True)
    return F.cross_entropy(logits_clean, y) + beta * kl


def mart_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    p_adv = F.softmax(logits_adv, 1)
    p_clean = F.softmax(logits_clean, 1)
    others = p_adv.masked_fill(F.one_hot(y, p_adv.shape[1]).bool(), float("-inf")).max(1).values
    bce = F.cross_entropy(logits_adv, y) - torch.log(1.0001 - others + 1e-12).mean()
    kl = (p_clean * (torch.log(p_clean + 1e-12) - torch.log(p_adv + 1e-12))).sum(1)
    p_true = p_clean.gather(1, y[:, None]).squeeze(1)
    return bce + beta * (kl * (1.0000001 - p_true)).mean()


RSLAD_ADV_WEIGHT = 5 / 6   # Zi et al. 2021's weight of the adversarial term (the clean term: 1/6)


def rslad_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, logits_teacher: torch.Tensor) -> torch.Tensor:
    """RSLAD: KL of the student's clean and adversarial outputs from the teacher's clean soft labels."""
    target = F.log_softmax(logits_teacher.float(), 1)
    kl_adv = F.kl_div(F.log_softmax(logits_adv, 1), target, reduction="batchmean", log_target=True)
    kl_clean = F.kl_div(F.log_softmax(logits_clean, 1), target, reduction="batchmean", log_target=True)
    return RSLAD_ADV_WEIGHT * kl_adv + (1 - RSLAD_ADV_WEIGHT) * kl_clean


# Each objective: (model in train mode, x, y, adversary, beta) -> (loss, logits on the attacked input).
Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor, Adversary, float], tuple[torch.Tensor, torch.Tensor]]


def _clean(model, x, y, adv, beta):
    logits = model(x)
    return F.cross_entropy(logits, y), logits


def _pgd_at(model, x, y, adv, beta):
    logits_adv = model(adv.attack(model, x, y))
    return pgd_at_loss(logits_adv, y), logits_adv


def _trades(model, x, y, adv, beta):
    x_adv = trades_adversary(model, x, eps=adv.eps, step_size=adv.step_size, steps=adv.steps, norm=adv.norm)
    logits_clean, logits_adv = model(x), model(x_adv)
    return trades_loss(logits_clean, logits_adv, y, beta), logits_adv


def _mart(model, x, y, adv, beta):
    x_adv = adv.attack(model, x, y)
    logits_clean, logits_adv = model(x), model(x_adv)
    return mart_loss(logits_clean, logits_adv, y, beta), logits_adv


OBJECTIVES: dict[str, Objective] = {"clean": _clean, "pgd_at": _pgd_at, "trades": _trades, "mart": _mart}


def _rslad(model, x, y, adv, beta, *, teacher: nn.Module):
    with torch.no_grad():
        logits_teacher = teacher(x)
    x_adv = trades_adversary(model, x, eps=adv.eps, step_size=adv.step_size, steps=adv.steps, norm=adv.norm,
                             target=F.softmax(logits_teacher.float(), 1))
    logits_clean, logits_adv = model(x), model(x_adv)
    return rslad_loss(logits_clean, logits_adv, logits_teacher), logits_adv


DISTILLATION = {"rslad": _rslad}   # objectives that fine-tune a pruned student from the dense teacher
if tuple(OBJECTIVES) != TRAIN_METHODS or tuple(DISTILLATION) != DISTILLATION_METHODS:   # one list of names: config's
    raise ImportError("mrpf.objectives: OBJECTIVES / DISTILLATION differ from mrpf.config's method names")


def objective_for(method: str, teacher: nn.Module | None = None) -> Objective:
    """The objective called ``method``; a distillation one bound to ``teacher`` (in eval mode)."""
    if method not in DISTILLATION:
        return OBJECTIVES[method]
    if teacher is None:
        raise MrpfError(f"{method} distils a pruned model from the dense one: use it as prune.finetune_method")
    teacher.eval().requires_grad_(False)
    return lambda model, x, y, adv, beta: DISTILLATION[method](model, x, y, adv, beta, teacher=teacher)
