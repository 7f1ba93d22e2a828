"""Parameters: defaults, params.yaml, dotted command-line overrides, and validation.

``DEFAULTS`` documents every key; a params.yaml may set any subset of them. A key
that is not in ``DEFAULTS`` is an error naming the key (a typo must never be silently
ignored). Values such as ``8/255`` are read as fractions, without ``eval``.
"""

from __future__ import annotations

import copy
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from .errors import MrpfError

DEFAULTS: dict[str, Any] = {
    "seed": 0,                      # one seed drives splits, initialisation, shuffling and attacks
    "data": {
        "dataset": "cifar10",       # cifar10 | cifar100 | svhn | tinyimagenet
        "root": "data",             # where torchvision datasets / tiny-imagenet-200 live (downloaded there)
        "train_path": None,         # offline source: .npz file or ImageFolder directory (overrides the download)
        "test_path": None,          # offline source for the test split
        "download": True,           # try to download a missing dataset
        "offline_dir": None,        # `mrpf data`: look here first for DATASET-train.npz / DATASET-subset-train.npz
        "val_size": 500,            # fixed-seed validation split held out of training
        "calibration_size": 512,    # fixed-seed calibration subset of the training split (MRS)
        "augment": True,            # the dataset's standard augmentation (crop [+ flip])
    },
    "model": {
        "arch": "vgg11_w8",         # a name from mrpf.models.available(), or tv:NAME / timm:NAME
        "activation": "relu",       # relu | silu | gelu (registry ResNet/VGG only)
    },
    "attack": {                     # the threat model, for training and evaluation
        "norm": "linf",             # linf | l2
        "eps": "8/255",
    },
    "train": {
        "method": "pgd_at",         # clean | pgd_at | trades | mart
        "epochs": 30,
        "batch_size": 128,
        "lr": 0.1,                  # peak learning rate
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5.0e-4,
        "schedule": "onecycle",     # onecycle | cosine | multistep | constant
        "milestones": [0.5, 0.75],  # multistep: fractions of the epochs where lr *= gamma
        "gamma": 0.1,
        "beta": 6.0,                # TRADES / MART regularisation weight
        "steps": 5,                 # attack steps during training
        "step_size": None,          # None: 2.5 * eps / steps (Madry et al.); a given one must reach eps
        "val_pgd_steps": 10,        # PGD steps for the per-epoch validation accuracy (step: evaluate.step_size)
        "ema_decay": None,          # e.g. 0.995: validate and save an EMA of the weights (None: off)
    },
    "evaluate": {
        "n_images": 2000,           # test images for clean/FGSM/PGD/CW (all of them if fewer)
        "autoattack_images": 200,   # AutoAttack is the costliest: a smaller subset by default (0: skip it)
        "pgd_steps": 20,
        "step_size": None,          # PGD/CW step; None: 2.5 * eps / steps; a given one must reach eps
        "restarts": 1,
        "batch_size": 500,
        "latency_batch": 128,
        "latency_repeats": 20,
        "attacks": ["clean", "fgsm", "pgd", "cw", "autoattack"],
    },
    "mrs": {                        # Module Robustness Sensitivity (docs/method.md)
        "probe_ratio": 0.5,         # rho: fraction of a group's channels masked by the probe
        "attack": "adaptive",       # adaptive (re-attack each probed model) | fixed (reuse the unpruned delta)
        "signal": "robust",         # robust | clean (delta = 0)
        "steps": 5,                 # PGD steps of the probe attack (step 2.5 * eps / steps); bench/mrs_cost.py
        "batch_size": 256,
    },
    "prune": {
        "method": "mrpf",           # mrpf | mrpf_clean | uniform_l1 | global_magnitude | taylor_adv | random
        "sparsity": 0.5,            # S: fraction of the dense model's budget metric removed
        "metric": "macs",           # macs | params
        "alpha": 1.0,               # exponent on MRS in the allocation
        "r_max": 0.9,               # no group loses more than this fraction of its channels
        "cost_aware": True,         # weight ratios by the group's share of the budget metric
        "round_to": 1,              # keep each pruned group's channels a multiple of this (8 for GPUs)
        "steps": 3,                 # T iterative steps; step t reaches S * t / T
        "finetune_epochs": 2,       # E_t: fine-tuning epochs after each step
        "final_epochs": 4,          # extra epochs added to the last step's fine-tune
        "finetune_method": "trades",
        "finetune_lr": 0.01,        # peak lr of each fine-tune (cosine schedule)
    },
    "device": {
        "name": "auto",             # auto | cpu | cuda | cuda:N
        "threads": None,            # CPU threads (None: torch's default)
        "channels_last": True,      # measured +27 % on PGD steps on a 2-core CPU
        "bf16": False,              # bf16 autocast for training (CUDA, or a CPU with AMX/AVX512-BF16)
        "cuda_graphs": True,        # on CUDA: replay each training step from a CUDA graph
    },
}

_FRACTION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)\s*$")


def as_float(value: Any, key: str) -> float:
    """Read a number or a fraction string such as ``"8/255"``."""
    if isinstance(value, bool):
        raise MrpfError(f"{key}: expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        m = _FRACTION.match(value)
        if m:
            return float(Fraction(m.group(1)) / Fraction(m.group(2)))
        try:
            return float(value)
        except ValueError:
            pass
    raise MrpfError(f"{key}: expected a number or a fraction like 8/255, got {value!r}")


def pgd_step_size(params: dict, key: str, steps: int) -> float:
    """The step of a PGD attack of ``steps`` steps: the value at ``key``, or 2.5 * eps / steps
    (Madry et al., 2018) where it is null. A given step must be able to reach the radius
    (steps * step >= eps): a shorter one keeps PGD inside the ball (e.g. 2/255 under an L2
    radius of 0.5) and overstates robust accuracy."""
    eps = as_float(params["attack"]["eps"], "attack.eps")
    section, name = key.split(".")
    given = params[section][name]
    if given is None:
        return 2.5 * eps / max(steps, 1)
    step = as_float(given, key)
    if steps > 0 and steps * step < eps * (1 - 1e-9):
        raise MrpfError(f"{key}={given}: {steps} steps of {step:.4g} cannot reach the {params['attack']['norm']} "
                        f"radius attack.eps={eps:.4g}; set it to null (2.5 * eps / steps) or to at least "
                        f"{eps / steps:.4g}")
    return step


def _merge(base: dict, update: dict, prefix: str = "") -> None:
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if not prefix and key in WORKFLOW_KEYS:
            continue
        if key not in base:
            raise MrpfError(f"unknown parameter '{dotted}' (known here: {', '.join(sorted(base))})")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise MrpfError(f"parameter '{dotted}' must be a mapping, got {value!r}")
            _merge(base[key], value, dotted + ".")
        else:
            base[key] = value


def parse_override(text: str) -> dict:
    """Turn ``train.epochs=3`` into ``{"train": {"epochs": 3}}`` (the value is read as YAML)."""
    if "=" not in text:
        raise MrpfError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise MrpfError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    nested: dict = {}
    node = nested
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MrpfError(f"params file {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise MrpfError(f"params file {path}: malformed YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MrpfError(f"params file {path}: expected a mapping at the top level")
    return data


WORKFLOW_KEYS = ("grid", "grids")  # params.yaml keys that belong to the pipeline (mrpf/workflow.py)


def load_params(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> dict:
    """Defaults, updated by the params file (if any), then by the active grid's ``params``
    and ``dataset_params[data.dataset]`` (params.yaml ``grids``), then by dotted overrides
    (``grid=NAME`` picks the grid); validated. The result holds no workflow keys."""
    params = copy.deepcopy(DEFAULTS)
    raw = read_yaml(path) if path is not None else {}
    grid_name, grids = raw.pop("grid", None), raw.pop("grids", None) or {}
    _merge(params, raw)
    parsed = []
    for text in overrides:
        override = parse_override(text)
        if "grid" in override:
            grid_name = override.pop("grid")
        parsed.append(override)
    if grid_name is not None:
        if grid_name not in grids:
            raise MrpfError(f"grid: unknown grid {grid_name!r} (params file defines: {', '.join(grids) or 'none'})")
        grid = grids[grid_name] or {}
        _merge(params, copy.deepcopy(grid.get("params") or {}), "grids." + grid_name + ".params.")
        for override in parsed:
            _merge(params, copy.deepcopy(override))
        dataset_params = (grid.get("dataset_params") or {}).get(params["data"]["dataset"]) or {}
        _merge(params, copy.deepcopy(dataset_params), f"grids.{grid_name}.dataset_params.")
    for override in parsed:
        _merge(params, override)
    validate(params)
    return params


def _choice(params: dict, key: str, choices: tuple) -> None:
    section, name = key.split(".")
    value = params[section][name]
    if value not in choices:
        raise MrpfError(f"{key}: unknown value {value!r} (choose from {', '.join(map(str, choices))})")


def _positive_int(params: dict, key: str, allow_zero: bool = False) -> None:
    section, name = key.split(".")
    value = params[section][name]
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise MrpfError(f"{key}: expected a{' non-negative' if allow_zero else ' positive'} integer, got {value!r}")


def validate(params: dict) -> None:
    """Check values that are cheap to check up front; each failure names its key."""
    from .data import DATASETS
    from .models import check_arch
    from .objectives import OBJECTIVES

    if isinstance(params["seed"], bool) or not isinstance(params["seed"], int):
        raise MrpfError(f"seed: expected an integer, got {params['seed']!r}")
    if params["data"]["train_path"] is None and params["data"]["dataset"] not in DATASETS:
        raise MrpfError(f"data.dataset: unknown dataset {params['data']['dataset']!r} "
                        f"(choose from {', '.join(DATASETS)}, or set data.train_path to an .npz / ImageFolder)")
    check_arch(params["model"]["arch"])
    _choice(params, "attack.norm", ("linf", "l2"))
    _choice(params, "train.method", tuple(OBJECTIVES))
    _choice(params, "train.schedule", ("onecycle", "cosine", "multistep", "constant"))
    if as_float(params["attack"]["eps"], "attack.eps") < 0:
        raise MrpfError(f"attack.eps: must be >= 0, got {params['attack']['eps']!r}")
    _positive_int(params, "train.epochs", allow_zero=True)
    for key in ("train.batch_size", "evaluate.batch_size", "evaluate.latency_batch", "evaluate.latency_repeats",
                "evaluate.restarts", "evaluate.n_images", "evaluate.pgd_steps"):
        _positive_int(params, key)
    for key in ("train.steps", "train.val_pgd_steps", "evaluate.autoattack_images", "data.val_size",
                "data.calibration_size"):
        _positive_int(params, key, allow_zero=True)
    for key, steps in (("train.step_size", "train.steps"), ("evaluate.step_size", "evaluate.pgd_steps"),
                       ("evaluate.step_size", "train.val_pgd_steps")):
        section, name = steps.split(".")
        pgd_step_size(params, key, params[section][name])
    for key in ("train.lr", "train.momentum", "train.weight_decay", "train.gamma", "train.beta"):
        section, name = key.split(".")
        if as_float(params[section][name], key) < 0:
            raise MrpfError(f"{key}: must be >= 0, got {params[section][name]!r}")
    _choice(params, "mrs.attack", ("adaptive", "fixed"))
    _choice(params, "mrs.signal", ("robust", "clean"))
    _choice(params, "prune.method", ("mrpf", "mrpf_clean", "uniform_l1", "global_magnitude", "taylor_adv", "random"))
    _choice(params, "prune.metric", ("macs", "params"))
    _choice(params, "prune.finetune_method", tuple(OBJECTIVES))
    sparsity = as_float(params["prune"]["sparsity"], "prune.sparsity")
    if not 0 < sparsity < 1:
        raise MrpfError(f"prune.sparsity: must lie in (0, 1), got {params['prune']['sparsity']!r}")
    for key in ("mrs.probe_ratio", "prune.r_max"):
        section, name = key.split(".")
        if not 0 < as_float(params[section][name], key) <= 1:
            raise MrpfError(f"{key}: must lie in (0, 1], got {params[section][name]!r}")
    for key in ("mrs.steps", "prune.finetune_epochs", "prune.final_epochs"):
        _positive_int(params, key, allow_zero=True)
    for key in ("mrs.batch_size", "prune.steps", "prune.round_to"):
        _positive_int(params, key)
    decay = params["train"]["ema_decay"]
    if decay is not None and not 0 < as_float(decay, "train.ema_decay") < 1:
        raise MrpfError(f"train.ema_decay: must lie in (0, 1) or be null, got {decay!r}")
    unknown = set(params["evaluate"]["attacks"]) - {"clean", "fgsm", "pgd", "cw", "autoattack"}
    if unknown:
        raise MrpfError(f"evaluate.attacks: unknown attack(s) {sorted(unknown)} "
                        "(choose from clean, fgsm, pgd, cw, autoattack)")
