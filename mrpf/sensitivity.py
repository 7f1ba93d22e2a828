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
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import allocation, devices, latency
from . import data as data_mod
from . import groups as groups_mod
from .config import Params, plain
from .devices import Runtime
from .errors import MrpfError
from .groups import Group, channel_magnitude, masked
from .io import write_json
from .models import load_model
from .objectives import Adversary, probe_adversary


@dataclasses.dataclass(frozen=True)
class MrsSettings:
    probe_ratio: float = 0.5     # rho
    attack: str = "adaptive"     # adaptive | fixed
    signal: str = "robust"       # robust | clean
    floor: float = 1e-6          # MRS is floored at this small positive value
    seed: int = 0                # the same PGD random starts for every probe


def robust_loss(model, batches, adversary: Adversary | None, fixed_deltas: list | None, seed: int):
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
            x_adv = adversary.attack(model, x, y)
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


def compute_curves(model, groups: list[Group], calibration: data_mod.ImageSet, adversary: Adversary,
                   runtime: Runtime, settings: MrsSettings, ratios: tuple[float, ...], batch_size: int = 256,
                   log=None, measured: dict | None = None) -> dict:
    """Each group's relative robust-loss increase when the probe removes each of ``ratios``
    of its channels (``prune.allocation: loss_curve``): ``{"ratios", "increase": [per group]}``.
    ``measured``: an MRS result of this model; its probe ratio is not measured again."""
    columns = []
    for rho in ratios:
        if measured is not None and abs(measured["settings"]["probe_ratio"] - rho) < 1e-12:
            result = measured
        else:
            result = compute_mrs(model, groups, calibration, adversary, runtime,
                                 dataclasses.replace(settings, probe_ratio=rho), batch_size, log)
        columns.append([row["mrs"] for row in result["groups"]])
    return {"ratios": list(ratios), "increase": [list(values) for values in zip(*columns)]}


def loss_curves(curves: dict) -> list:
    """``allocation.LossCurve`` per group from a ``compute_curves`` result."""
    return [allocation.LossCurve(curves["ratios"], increase) for increase in curves["increase"]]


def seeded_scope(device: torch.device):
    """A scope whose ``torch.manual_seed`` calls leave the caller's random state (CPU and
    ``device``) as it was."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def _compute_mrs(model, groups, calibration, adversary, runtime, settings, batch_size, log) -> dict:
    batches = list(data_mod.Batches(calibration, batch_size, runtime.device, channels_last=runtime.channels_last))
    attack = None if settings.signal == "clean" else adversary
    was_training = model.training
    base_loss, base_acc, base_deltas = robust_loss(model, batches, attack, None, settings.seed)
    rows = []
    for group in groups:
        channels = probe_channels(model, group, settings.probe_ratio)
        fixed = base_deltas if (settings.attack == "fixed" and attack is not None) else None
        with masked(model, group, channels):
            loss, acc, _ = robust_loss(model, batches, attack, fixed, settings.seed)
        mrs = max(settings.floor, (loss - base_loss) / base_loss) if base_loss > 0 else settings.floor
        rows.append({**group.describe(), "probe_channels": len(channels), "probe_loss": loss,
                     "probe_acc": acc, "mrs": mrs})
        if log:
            log(f"group {group.id:3d} {group.root:<28s} ch {group.channels:4d}  loss {loss:.4f}  MRS {mrs:.4g}")
    model.train(was_training)
    return {"base_loss": base_loss, "base_acc": base_acc, "settings": dataclasses.asdict(settings),
            "adversary": dataclasses.asdict(adversary), "batch_size": batch_size,
            "calibration_images": len(calibration), "groups": rows}


# The probe attacks' random starts, fixed like the data splits: runs with other fine-tuning
# seeds measure the dense model's MRS alike, so they share the mrs stage's result.
PROBE_SEED = 0


def mrs_settings(params: Params, signal: str | None = None) -> MrsSettings:
    """The probe settings of ``params`` (``signal`` overrides mrs.signal: mrpf_clean)."""
    m = params.mrs
    return MrsSettings(probe_ratio=m.probe_ratio, attack=m.attack, signal=signal or m.signal, seed=PROBE_SEED)


def check_reusable(result: dict, path, model, arch: dict, calibration: data_mod.ImageSet, params: Params) -> None:
    """Refuse an ``mrs.json`` that was not measured on this model with this run's MRS settings
    (probe, attack, calibration set, groups): reusing it would not be the same as measuring."""
    _, found = groups_mod.find_groups(model, arch["input_size"], arch["num_classes"])
    expected = {"settings": dataclasses.asdict(mrs_settings(params)),
                "adversary": dataclasses.asdict(probe_adversary(params)), "batch_size": params.mrs.batch_size,
                "calibration_images": len(calibration),
                "groups": [(g.root, g.channels) for g in found]}
    found_there = {k: result.get(k) for k in expected if k != "groups"}
    found_there["groups"] = [(r["root"], r["channels"]) for r in result.get("groups", [])]
    if params.prune.allocation == "loss_curve":   # only then: older mrs.json files hold no curves
        expected["curve_ratios"] = list(params.mrs.curve_ratios)
        found_there["curve_ratios"] = (result.get("curves") or {}).get("ratios")
    differ = [k for k in expected if plain(expected[k]) != plain(found_there[k])]
    if differ:
        raise MrpfError(f"{path}: measured with other {', '.join(differ)} than this prune run; "
                        f"rerun `mrpf mrs` with the same parameters or leave out --mrs")


def run_mrs(params: Params, checkpoint: str | Path, run_dir: str | Path, log=print,
            sparsities: list[float] | None = None) -> dict:
    """``mrpf mrs``: MRS of every group of a checkpoint and the ratios MRPF would allocate at
    each of ``sparsities`` (default: prune.sparsity); writes ``mrs.json`` and ``mrs.png``."""
    from .reporting import plot_mrs

    run_dir = Path(run_dir)
    runtime = devices.setup(params.device, log)
    model, state = load_model(checkpoint, runtime)
    arch = state["arch"]
    splits = data_mod.load_splits(params.data, with_test=False)
    _, found = groups_mod.find_groups(model, arch["input_size"], arch["num_classes"])
    started = time.perf_counter()
    result = compute_mrs(model, found, splits.calibration, probe_adversary(params), runtime, mrs_settings(params),
                         params.mrs.batch_size, log)
    pp = params.prune
    curves = None
    if pp.allocation == "loss_curve":
        result["curves"] = compute_curves(model, found, splits.calibration, probe_adversary(params), runtime,
                                          mrs_settings(params), params.mrs.curve_ratios, params.mrs.batch_size, log,
                                          measured=result)
        curves = loss_curves(result["curves"])
    result["seconds"] = time.perf_counter() - started
    ratios, result["allocation"] = {}, []
    table = latency.table_if_budgeted(params, model, arch["input_size"], runtime, run_dir, log)
    for sparsity in sparsities or [pp.sparsity]:
        solved = allocation.solve(model, found, [r["mrs"] for r in result["groups"]], input_size=arch["input_size"],
                                  num_classes=arch["num_classes"], budget=sparsity, metric=pp.metric, alpha=pp.alpha,
                                  r_max=pp.r_max, cost_aware=pp.cost_aware, round_to=pp.round_to, curves=curves,
                                  table=table)
        ratios[sparsity] = solved["ratios"]
        result["allocation"].append({"sparsity": sparsity, "metric": pp.metric, "achieved": solved["achieved"],
                                     "ratios": solved["ratios"]})
    plot_mrs(result, ratios, run_dir / "mrs.png", f"MRS and MRPF's ratios per {pp.metric} reduction ({arch['name']})")
    write_json(run_dir / "mrs.json", result)
    return result
