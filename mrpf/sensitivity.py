"""Module Robustness Sensitivity (MRS): how much the robust loss suffers when a group is pruned.

For a group g and probe ratio rho (docs/method.md):

    R(theta)      = mean CE(f_theta(x + delta), y) over the calibration set,
                    delta from PGD-k against the model measured (``signal: robust``) or 0 (``clean``)
    theta (-) (g, rho) = theta with the rho-fraction of g's smallest-magnitude channels masked
    MRS_g         = max(floor, (R(theta (-) (g, rho)) - R(theta)) / R(theta))

``attack: adaptive`` re-attacks every probed model; ``fixed`` reuses the unpruned model's
delta (cheaper, and blind to how pruning moves the decision boundary).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from . import data as data_mod
from .attacks import pgd
from .devices import Runtime
from .errors import MrpfError
from .groups import Group, channel_magnitude, masked
from .objectives import Adversary


@dataclasses.dataclass(frozen=True)
class MrsSettings:
    probe_ratio: float = 0.5     # rho
    attack: str = "adaptive"     # adaptive | fixed
    signal: str = "robust"       # robust | clean
    floor: float = 1e-6          # MRS is floored at this small positive value
    seed: int = 0                # the same PGD random starts for every probe


def _robust_loss(model, batches, adversary: Adversary | None, fixed_deltas: list | None, seed: int):
    """(mean CE, accuracy, deltas) over the calibration batches, in eval mode."""
    model.eval()
    total, correct, count, deltas = 0.0, 0, 0, []
    for i, (x, y) in enumerate(batches):
        if fixed_deltas is not None:
            x_adv = (x + fixed_deltas[i]).clamp(0, 1)
        elif adversary is None:
            x_adv = x
        else:
            torch.manual_seed(seed + i)
            x_adv = pgd(model, x, y, eps=adversary.eps, step_size=adversary.step_size, steps=adversary.steps,
                        norm=adversary.norm)
        deltas.append(x_adv - x)
        with torch.no_grad():
            logits = model(x_adv)
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
        count += len(y)
    return total / count, correct / count, deltas


def probe_channels(model, group: Group, ratio: float) -> torch.Tensor:
    """The floor(ratio * channels) smallest-magnitude channels of the group (at least one)."""
    n = max(1, min(group.channels - 1, int(math.floor(ratio * group.channels))))
    return torch.argsort(channel_magnitude(model, group))[:n]


def compute_mrs(model, groups: list[Group], calibration: data_mod.ImageSet, adversary: Adversary,
                runtime: Runtime, settings: MrsSettings, batch_size: int = 256, log=None) -> dict:
    """MRS of every group, with the probe's robust loss and accuracy (the content of mrs.json).

    The probe attacks draw from ``settings.seed``; torch's global random state is restored
    afterwards, so measuring MRS does not change what a caller draws next.
    """
    if len(calibration) == 0:
        raise MrpfError("MRS needs calibration images: data.calibration_size must be positive")
    with seeded_scope(runtime.device):
        return _compute_mrs(model, groups, calibration, adversary, runtime, settings, batch_size, log)


def seeded_scope(device: torch.device):
    """A scope whose ``torch.manual_seed`` calls leave the caller's random state (CPU and
    ``device``) as it was."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def _compute_mrs(model, groups, calibration, adversary, runtime, settings, batch_size, log) -> dict:
    batches = list(data_mod.Batches(calibration, batch_size, runtime.device, channels_last=runtime.channels_last))
    attack = None if settings.signal == "clean" else adversary
    was_training = model.training
    base_loss, base_acc, base_deltas = _robust_loss(model, batches, attack, None, settings.seed)
    rows = []
    for group in groups:
        channels = probe_channels(model, group, settings.probe_ratio)
        fixed = base_deltas if (settings.attack == "fixed" and attack is not None) else None
        with masked(model, group, channels):
            loss, acc, _ = _robust_loss(model, batches, attack, fixed, settings.seed)
        mrs = max(settings.floor, (loss - base_loss) / base_loss) if base_loss > 0 else settings.floor
        rows.append({**group.describe(), "probe_channels": len(channels), "probe_loss": loss,
                     "probe_acc": acc, "mrs": mrs})
        if log:
            log(f"group {group.id:3d} {group.root:<28s} ch {group.channels:4d}  loss {loss:.4f}  MRS {mrs:.4g}")
    model.train(was_training)
    return {"base_loss": base_loss, "base_acc": base_acc, "settings": dataclasses.asdict(settings),
            "calibration_images": len(calibration), "groups": rows}
