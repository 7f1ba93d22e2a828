"""``mrpf import``: a model trained elsewhere (a torchvision / timm architecture plus its
state dict) as an mrpf dense checkpoint that every stage accepts, evaluated on import.

The weights file is read with ``torch.load(weights_only=True)``; a dict nesting the weights
under ``state_dict``, ``model`` or ``net`` is unwrapped, and key prefixes every key shares
(``module.`` from DataParallel, ``model.``, ``net.``, ``_orig_mod.`` from torch.compile)
are stripped. The normalisation is ``--mean`` / ``--std``, else the file's own (mrpf's
``normalize.mean`` / ``normalize.std`` keys, or the ``mu`` / ``sigma`` buffers of RobustBench
models that normalise inside), else, for the RobustBench-layout architectures (``wrnD_K``,
``preact_resnet18*``), none (mean 0, std 1: RobustBench's CIFAR models take raw [0, 1] pixels),
else the dataset's; the checkpoint records which. Missing or unexpected keys, or a
classifier of another class count, are one error naming the keys.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import data as data_mod
from .config import Params
from .errors import MrpfError
from .io import load_checkpoint, save_checkpoint
from .models import arch_description, build_model, robustbench_layout

PREFIXES = ("module.", "model.", "net.", "_orig_mod.")
NESTING = ("state_dict", "model", "net")
NORMALIZE_KEYS = (("normalize.mean", "normalize.std"), ("mu", "sigma"))   # mrpf's; RobustBench's in-model buffers


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, unwrapped and with shared prefixes stripped."""
    path = Path(path)
    if not path.is_file():
        raise MrpfError(f"weights {path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # any unreadable or code-carrying file: one line
        raise MrpfError(f"weights {path}: not a readable state dict ({str(e).strip().splitlines()[0]})") from None
    if isinstance(obj, dict) and "arch" in obj and "state_dict" in obj and "format" in obj:
        return dict(load_checkpoint(path)["state_dict"])   # already an mrpf checkpoint
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in NESTING if isinstance(obj.get(k), dict)), None)
        if key is None:
            break
        obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MrpfError(f"weights {path}: expected a state dict (names -> tensors), possibly under "
                        f"{' / '.join(NESTING)}")
    stripped = True
    while stripped:
        stripped = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in obj):
                obj = {k[len(prefix):]: v for k, v in obj.items()}
                stripped = True
    return obj


def import_model(params: Params, arch: str, weights: str | Path, run_dir: str | Path, log=print,
                 mean: list[float] | None = None, std: list[float] | None = None) -> dict:
    """Write ``run_dir/checkpoint.pt`` (mrpf's dense checkpoint of ``arch`` with ``weights``)."""
    spec = data_mod.spec_for(params.data)
    state = read_state_dict(weights)
    found = next(((state.pop(m), state.pop(s)) for m, s in NORMALIZE_KEYS if m in state and s in state), None)
    if mean is None and std is None and found is not None:
        mean, std, source = found[0].flatten().tolist(), found[1].flatten().tolist(), "the weights file"
    elif mean is not None and std is not None:
        source = "given"
    elif mean is None and std is None and robustbench_layout(arch):
        mean, std, source = [0.0] * 3, [1.0] * 3, "none (raw [0, 1] pixels, RobustBench's convention)"
    elif mean is None and std is None:
        mean, std, source = list(spec.mean), list(spec.std), f"the {params.data.dataset} default"
    else:
        raise MrpfError("give both --mean and --std, or neither")
    if len(mean) != 3 or len(std) != 3:
        raise MrpfError(f"--mean / --std: three values each (RGB), got {mean} and {std}")
    model = build_model(arch, spec.num_classes, spec.input_size, mean, std, params.model.activation)
    expected = model.net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise MrpfError(f"weights {weights} do not fit {arch}: " + "; ".join(
            f"{what} keys {', '.join(keys[:6])}{' …' if len(keys) > 6 else ''} ({len(keys)})"
            for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys))
    wrong = [k for k in expected if tuple(expected[k].shape) != tuple(state[k].shape)]
    if wrong:
        k = wrong[0]
        if expected[k].ndim >= 1 and state[k].ndim == expected[k].ndim and expected[k].shape[0] == spec.num_classes:
            raise MrpfError(f"weights {weights}: {k} has {state[k].shape[0]} classes, dataset "
                            f"{params.data.dataset!r} has {spec.num_classes}")
        raise MrpfError(f"weights {weights} do not fit {arch}: {k} is {tuple(state[k].shape)}, the architecture's "
                        f"is {tuple(expected[k].shape)}" + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))
    model.net.load_state_dict(state)
    description = arch_description(arch, spec.num_classes, spec.input_size, mean, std, params.model.activation)
    run_dir = Path(run_dir)
    save_checkpoint(run_dir / "checkpoint.pt", description, model.state_dict(), epoch=0, params=params.to_dict(),
                    imported={"weights": str(weights), "normalisation": source})
    log(f"imported {weights} as {arch} ({spec.num_classes} classes, normalisation from {source}) -> "
        f"{run_dir / 'checkpoint.pt'}")
    return {"arch": description, "normalisation": source}
