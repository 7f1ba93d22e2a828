"""The allocation's strength chosen on the jointly pruned model (``prune.allocation: joint_search``).

MRS probes one group at a time, so the inverse-MRS rule cannot see a bottleneck that only
appears when several groups are pruned together (docs/results-cifar10-subset.md). After
EagleEye (Li et al., ECCV 2020), which ranks candidate pruned networks by their accuracy
after *adaptive batch normalisation* (BN statistics re-estimated on a few batches, no
training), every step prunes a copy for each strength t in ``STRENGTHS`` of the rule

    r_g = min(cap_g, lambda (w_g / MRS_g^alpha)^t)      (t = 0: uniform; t = 1: the paper's rule)

and keeps the one whose robust loss R (sensitivity.py: PGD of the MRS probe against the
pruned copy, on the calibration set) is lowest. The BN statistics are re-estimated on
adversarial examples of the unpruned model: an adversarially trained network's BN layers
were fitted on adversarial inputs. Calibration images only, never the test set.

With ``prune.search_finetune_batches`` > 0 each candidate is fine-tuned that many batches
before it is scored (the same training batches and attack starts for every candidate), so
the choice ranks how well a candidate recovers rather than its loss right after pruning;
a proxy for the learned ratios of HARP (Zhao & Wressnegger, ICLR 2023) at a fixed cost.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from . import allocation
from . import data as data_mod
from .devices import Runtime
from .objectives import Adversary
from .sensitivity import PROBE_SEED, robust_loss, seeded_scope

STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)   # from uniform to the paper's rule, both ends included


def adapt_batchnorm(model: nn.Module, inputs: list[torch.Tensor]) -> None:
    """EagleEye's adaptive BN: every BatchNorm's running mean and variance re-estimated as the
    plain average over ``inputs`` (forward passes without gradients); the model is left in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None          # cumulative average over the batches
    model.train()
    with torch.no_grad():
        for x in inputs:
            model(x)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()


def select_strength(solve_at, model: nn.Module, calibration: data_mod.ImageSet, adversary: Adversary,
                    runtime: Runtime, batch_size: int, input_size: int, num_classes: int, round_to: int,
                    log=None, tune: Callable[[nn.Module], None] | None = None) -> tuple[dict, list[dict]]:
    """The ``allocation.solve`` result of the strength whose pruned copy has the lowest robust
    loss after adaptive BN (and ``tune(copy)``, a short fine-tune, where given), and one row per
    candidate (strength, ratios, achieved, robust loss and accuracy). ``solve_at(strength)``
    solves the budget at that strength."""
    batches = list(data_mod.Batches(calibration, batch_size, runtime.device, channels_last=runtime.channels_last))
    was_training = model.training
    best, rows = None, []
    with seeded_scope(runtime.device):
        _, _, deltas = robust_loss(model, batches, adversary, None, PROBE_SEED)
        adversarial = [(x + d).clamp(0, 1) for (x, _), d in zip(batches, deltas)]
        for strength in STRENGTHS:
            solved = solve_at(strength)
            pruned, _ = allocation.prune_copy(model, input_size, num_classes, solved["ratios"], round_to,
                                              solved["caps"])
            adapt_batchnorm(pruned, adversarial)
            if tune is not None:
                tune(pruned)
            loss, acc, _ = robust_loss(pruned, batches, adversary, None, PROBE_SEED)
            rows.append({"strength": strength, "ratios": solved["ratios"], "achieved": solved["achieved"],
                         "robust_loss": loss, "robust_acc": acc})
            if log:
                log(f"strength {strength:.2f}: robust loss {loss:.4f}, robust acc {acc:.1%} after adaptive BN"
                    + ("" if tune is None else " and the short fine-tune"))
            if best is None or loss < best[0]:
                best = (loss, solved)
    model.train(was_training)
    return best[1], rows
