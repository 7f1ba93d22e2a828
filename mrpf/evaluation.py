"""Evaluation (``mrpf evaluate``): clean / FGSM / PGD / CW-L-inf / AutoAttack accuracy,
parameters, MACs and latency, in one metrics JSON plus per-image outcomes.

Robust accuracy is always measured in fp32 and eval mode. Per-image outcomes (which test
images each attack failed on) are kept so that two models can be compared with paired
statistics on the same images.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from . import data as data_mod
from . import devices
from .attacks import autoattack, fgsm
from .config import Params
from .errors import MrpfError
from .io import atomic_path, crash_point, write_json
from .models import count_ops, count_parameters, load_model
from .objectives import evaluation_adversary
from .timing import latency_ms


def correct_under(model: torch.nn.Module, images: data_mod.ImageSet, attack, runtime: devices.Runtime,
                  batch_size: int) -> torch.Tensor:
    """Per image: does the model classify the attacked image right? ``attack(x, y) -> x_adv`` or None."""
    out = []
    for x, y in data_mod.Batches(images, batch_size, runtime.device, channels_last=runtime.channels_last):
        crash_point("batch")
        if attack is not None:
            x = attack(x, y)
        with torch.no_grad():
            out.append((model(x).argmax(1) == y).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def evaluate(params: Params, checkpoint: str | Path, out_path: str | Path, log=print) -> dict:
    """Evaluate ``checkpoint`` on the test split; write metrics JSON to ``out_path`` and outcomes beside it."""
    runtime = devices.setup(params.device, log)
    ev = params.evaluate
    model, state = load_model(checkpoint, runtime)
    spec = data_mod.spec_for(params.data)
    test = data_mod.read_source(params.data, "test")
    arch = state["arch"]
    if arch["num_classes"] != spec.num_classes or arch["input_size"] != test.x.shape[-1]:
        raise MrpfError(f"checkpoint {checkpoint}: model is for {arch['num_classes']} classes at "
                        f"{arch['input_size']}px, the test data has {spec.num_classes} classes at {test.x.shape[-1]}px")
    images = data_mod.fixed_subset(test, ev.n_images)
    eps, norm = params.attack.eps, params.attack.norm
    adversary = evaluation_adversary(params)
    torch.manual_seed(params.seed)

    attacks = {
        "clean": None,
        "fgsm": lambda x, y: fgsm(model, x, y, eps=eps, norm=norm),
        "pgd": lambda x, y: adversary.attack(model, x, y, restarts=ev.restarts),
        "cw": lambda x, y: adversary.attack(model, x, y, loss="cw", restarts=ev.restarts),
    }
    metrics: dict = {"checkpoint": str(checkpoint), "arch": arch["name"], "eps": eps, "norm": norm,
                     "pgd_steps": ev.pgd_steps, "step_size": adversary.step_size, "n_images": len(images),
                     "device": str(runtime.device)}
    outcomes: dict[str, np.ndarray] = {}
    for name in ev.attacks:
        t0 = time.perf_counter()
        if name == "autoattack":
            subset = data_mod.fixed_subset(test, ev.autoattack_images)
            if len(subset) == 0:
                continue
            correct = autoattack(model, subset.x.float().div(255).to(runtime.device), subset.y.to(runtime.device),
                                 eps=eps, norm=norm, batch_size=ev.batch_size, seed=params.seed)
            metrics["autoattack_images"] = len(subset)
        else:
            correct = correct_under(model, images, attacks[name], runtime, ev.batch_size)
        outcomes[name] = correct.numpy()
        metrics[f"{name}_acc"] = float(correct.float().mean()) if len(correct) else float("nan")
        log(f"{name:>10}: {metrics[f'{name}_acc']:.4f}  ({len(correct)} images, {time.perf_counter() - t0:.1f}s)")

    metrics["params"] = count_parameters(model)
    metrics["macs"] = count_ops(model, arch["input_size"])["macs"]
    metrics["latency_ms"] = latency_ms(model, arch["input_size"], runtime, ev.latency_batch, ev.latency_repeats)
    metrics["latency_batch"] = ev.latency_batch

    out_path = Path(out_path)
    with atomic_path(out_path.with_name(out_path.stem + "_per_image.npz")) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **outcomes)
    write_json(out_path, metrics)
    return metrics
