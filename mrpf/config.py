"""Parameters: typed sections, parsed and checked once, from defaults, params.yaml and overrides.

Each section of params.yaml is a frozen dataclass below (every key, its type, its default
and a one-line comment); ``load_params`` merges the defaults, a params file (with the
active grid's parameters, resolved by :mod:`mrpf.workflow`) and dotted command-line
overrides as plain data, then ``parse`` turns the result into a :class:`Params`: each
value converted to its type (``8/255`` read as a fraction, without ``eval``) and checked
once, each failure naming its key. A key that is not a field is an error naming the key
(a typo must never be silently ignored). Code below this module takes typed values only.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from .datasets import DATASETS
from .errors import MrpfError

# Each list of names, defined once (the schema and the CLI help are tested against these).
NORMS = ("linf", "l2")
OFFLINE_SETS = ("full", "subset")
SCHEDULES = ("onecycle", "cosine", "multistep", "constant")
EVALUATION_ATTACKS = ("clean", "fgsm", "pgd", "cw", "autoattack")
MRS_ATTACKS = ("adaptive", "fixed")
MRS_SIGNALS = ("robust", "clean")
ALLOCATION_METHODS = ("mrpf", "mrpf_clean", "uniform_l1")      # per-group ratios by the budget solve
GLOBAL_METHODS = ("global_magnitude", "taylor_adv", "random")    # one global threshold on channel scores
LEARNED_METHODS = ("hydra", "harp")                            # channel scores (and rates) learned, weights frozen
PRUNE_METHODS = ALLOCATION_METHODS + GLOBAL_METHODS + LEARNED_METHODS
SCORE_RATIOS = ("uniform", "mrpf")                               # the per-group ratios HYDRA's masks keep
BUDGET_METRICS = ("macs", "params", "latency")
ALLOCATION_RULES = ("inverse_mrs", "loss_curve", "joint_search")   # how mrpf turns probe results into per-group ratios
TRAIN_METHODS = ("clean", "pgd_at", "trades", "mart")          # training objectives (mrpf.objectives.OBJECTIVES)
DISTILLATION_METHODS = ("rslad",)                              # fine-tune a pruned student from the dense teacher
FINETUNE_METHODS = TRAIN_METHODS + DISTILLATION_METHODS


@dataclasses.dataclass(frozen=True)
class DataParams:
    dataset: str = "cifar10"            # cifar10 | cifar100 | svhn | tinyimagenet
    root: str = "data"                  # where torchvision datasets / tiny-imagenet-200 live (downloaded there)
    train_path: str | tuple[str, ...] | None = None   # offline source: .npz, ImageFolder dir, or WebDataset shards
    test_path: str | tuple[str, ...] | None = None    # (a .tar[.gz] shard, a glob or a list) for the test split
    download: bool = True               # try to download a missing dataset
    offline_dir: str | None = None      # look here for DATASET-train.npz, shards DATASET-train-*.tar.gz, a subset
    offline_set: str = "full"           # full: the whole dataset's copy before DATASET-subset-*.npz; subset: reverse
    val_size: int = 500                 # fixed-seed validation split held out of training
    calibration_size: int = 512         # fixed-seed calibration subset of the training split (MRS)
    augment: bool = True                # the dataset's standard augmentation (crop [+ flip])


@dataclasses.dataclass(frozen=True)
class ModelParams:
    arch: str = "vgg11_w8"              # a name from mrpf.models.available(), or tv:NAME / timm:NAME
    activation: str = "relu"            # relu | silu | gelu (registry ResNet/VGG only)


@dataclasses.dataclass(frozen=True)
class AttackParams:                     # the threat model, for training and evaluation
    norm: str = "linf"                  # linf | l2
    eps: float = 8 / 255                # radius in pixel units ([0, 1] scale); params files may write 8/255


@dataclasses.dataclass(frozen=True)
class TrainParams:
    method: str = "pgd_at"              # clean | pgd_at | trades | mart
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1                     # peak learning rate
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5.0e-4
    schedule: str = "onecycle"          # onecycle | cosine | multistep | constant
    milestones: tuple[float, ...] = (0.5, 0.75)   # multistep: fractions of the epochs where lr *= gamma
    gamma: float = 0.1
    beta: float = 6.0                   # TRADES / MART regularisation weight
    steps: int = 5                      # attack steps during training
    step_size: float | None = None      # None: 2.5 * eps / steps (Madry et al.); a given one must reach eps
    val_pgd_steps: int = 10             # PGD steps for the per-epoch validation accuracy (step: evaluate.step_size)
    ema_decay: float | None = None      # e.g. 0.995: validate and save an EMA of the weights (None: off)


@dataclasses.dataclass(frozen=True)
class EvaluateParams:
    n_images: int = 2000                # test images for clean/FGSM/PGD/CW (all of them if fewer)
    autoattack_images: int = 200        # AutoAttack is the costliest: a smaller subset by default (0: skip it)
    pgd_steps: int = 20
    step_size: float | None = None      # PGD/CW step; None: 2.5 * eps / steps; a given one must reach eps
    restarts: int = 1
    batch_size: int = 500
    latency_batch: int = 128
    latency_repeats: int = 20
    attacks: tuple[str, ...] = EVALUATION_ATTACKS


@dataclasses.dataclass(frozen=True)
class MrsParams:                        # Module Robustness Sensitivity (docs/method.md)
    probe_ratio: float = 0.5            # rho: fraction of a group's channels masked by the probe
    attack: str = "adaptive"            # adaptive (re-attack each probed model) | fixed (reuse the unpruned delta)
    signal: str = "robust"              # robust | clean (delta = 0)
    steps: int = 5                      # PGD steps of the probe attack (step 2.5 * eps / steps)
    batch_size: int = 256
    curve_ratios: tuple[float, ...] = (0.25, 0.5, 0.75)   # probe ratios of prune.allocation: loss_curve


@dataclasses.dataclass(frozen=True)
class PruneParams:
    method: str = "mrpf"                # one of PRUNE_METHODS
    sparsity: float = 0.5               # S: fraction of the dense model's budget metric removed
    metric: str = "macs"                # macs | params | latency (measured table, mrpf/latency.py)
    allocation: str = "joint_search"    # joint_search: r ~ (w / MRS^alpha)^t, t by the jointly pruned model
                                        # | inverse_mrs: the paper's r ~ w / MRS^alpha | loss_curve: min loss rise
    alpha: float = 1.0                  # exponent on MRS in the allocation
    r_max: float = 0.9                  # no group loses more than this fraction of its dense channels
    cost_aware: bool = True             # weight ratios by the group's share of the budget metric
    round_to: int = 1                   # keep each pruned group's channels a multiple of this (8 for GPUs)
    steps: int = 3                      # T iterative steps; step t reaches S * t / T
    finetune_epochs: int = 2            # E_t: fine-tuning epochs after each step
    final_epochs: int = 4               # extra epochs added to the last step's fine-tune
    finetune_method: str = "trades"     # clean | pgd_at | trades | mart | rslad (distils from the dense model)
    finetune_lr: float = 0.01           # peak lr of each fine-tune (cosine schedule)
    search_finetune_batches: int = 0    # joint_search: fine-tuning batches per candidate before scoring (0: none)
    score_epochs: int = 5               # hydra / harp: epochs of score (and rate) learning per step, weights frozen
    score_ratios: str = "uniform"       # hydra: ratios its masks keep: uniform | mrpf (the mrpf method's allocation)
    score_lr: float = 0.1               # hydra / harp: peak lr of score learning (SGD, cosine; HYDRA's)


@dataclasses.dataclass(frozen=True)
class DeviceParams:
    name: str = "auto"                  # auto | cpu | cuda | cuda:N
    threads: int | None = None          # CPU threads (None: torch's default)
    channels_last: bool = True          # faster PGD steps on CPU and GPU (docs/performance.md)
    bf16: bool = False                  # bf16 autocast for training (CUDA, or a CPU with AMX/AVX512-BF16)
    cuda_graphs: bool = True            # on CUDA: replay each training step from a CUDA graph


@dataclasses.dataclass(frozen=True)
class Params:
    seed: int = 0                       # one seed drives initialisation, shuffling and attacks
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    attack: AttackParams = AttackParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    mrs: MrsParams = MrsParams()
    prune: PruneParams = PruneParams()
    device: DeviceParams = DeviceParams()

    def to_dict(self) -> dict:
        """Plain data (lists, numbers, strings): for checkpoints, resume keys and JSON."""
        return plain(dataclasses.asdict(self))

    def replace(self, section: str, **changes: Any) -> "Params":
        """A copy with ``changes`` to one section (values already typed)."""
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})


SECTIONS: dict[str, type] = {f.name: f.default.__class__ for f in dataclasses.fields(Params) if f.name != "seed"}
WORKFLOW_KEYS = ("grid", "grids")                 # params.yaml keys that belong to the pipeline (mrpf/workflow.py)
POSITIVE = {"train.batch_size", "evaluate.batch_size", "evaluate.latency_batch", "evaluate.latency_repeats",
            "evaluate.restarts", "evaluate.n_images", "evaluate.pgd_steps", "mrs.batch_size", "prune.steps",
            "prune.round_to", "prune.score_epochs", "device.threads"}   # integers that must be >= 1 (the others: >= 0)


def plain(value: Any) -> Any:
    """Nested dicts, lists and tuples as dicts and lists (as JSON would give them back)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


DEFAULTS: dict[str, Any] = Params().to_dict()   # every key with its default, as plain data


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


def _as_int(value: Any, key: str) -> int:
    positive = key in POSITIVE
    if isinstance(value, bool) or not isinstance(value, int) or value < (1 if positive else 0):
        raise MrpfError(f"{key}: expected a{' positive' if positive else ' non-negative'} integer, got {value!r}")
    return value


def _as_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise MrpfError(f"{key}: expected true or false, got {value!r}")
    return value


def _as_str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise MrpfError(f"{key}: expected a string, got {value!r}")
    return value


def _as_list(value: Any, key: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise MrpfError(f"{key}: expected a list, got {value!r}")
    return list(value)


_CONVERT = {
    "float": as_float, "int": _as_int, "bool": _as_bool, "str": _as_str,
    "tuple[float, ...]": lambda v, k: tuple(as_float(x, k) for x in _as_list(v, k)),
    "tuple[str, ...]": lambda v, k: tuple(_as_str(x, k) for x in _as_list(v, k)),
    "str | tuple[str, ...]": lambda v, k: v if isinstance(v, str) else tuple(_as_str(x, k) for x in _as_list(v, k)),
}


def _convert(value: Any, annotation: str, key: str) -> Any:
    base, optional = annotation.removesuffix(" | None"), annotation.endswith(" | None")
    if optional and value is None:
        return None
    return _CONVERT[base](value, key)


def pgd_step_size(attack: AttackParams, given: float | None, steps: int) -> float:
    """The step of a PGD attack of ``steps`` steps: ``given``, or 2.5 * eps / steps (Madry et
    al., 2018) where it is None."""
    return 2.5 * attack.eps / max(steps, 1) if given is None else given


def _check_reach(attack: AttackParams, key: str, raw: Any, given: float | None, steps: int) -> None:
    """A given step must be able to reach the radius (steps * step >= eps): a shorter one keeps
    PGD inside the ball (e.g. 2/255 under an L2 radius of 0.5) and overstates robust accuracy."""
    if given is not None and steps > 0 and steps * given < attack.eps * (1 - 1e-9):
        raise MrpfError(f"{key}={raw}: {steps} steps of {given:.4g} cannot reach the {attack.norm} "
                        f"radius attack.eps={attack.eps:.4g}; set it to null (2.5 * eps / steps) or to at least "
                        f"{attack.eps / steps:.4g}")


def _check_radius(attack: AttackParams, raw: Any, spec) -> None:
    """A radius in the wrong unit (the common slip: ``8`` meant as 8/255) would run and report
    0 % robust accuracy. Inputs are pixels in [0, 1]: an L-inf radius of 1 or more, or an L2
    radius beyond the image's diagonal (sqrt(3 * H * W), every pixel moved 0 -> 1), is refused."""
    if attack.norm == "linf" and attack.eps >= 1:
        raise MrpfError(f"attack.eps: {raw} is outside the pixel range [0, 1]; did you mean {raw}/255?")
    size = spec.input_size if spec is not None else 32
    diagonal = (3 * size * size) ** 0.5
    if attack.norm == "l2" and attack.eps > diagonal:
        raise MrpfError(f"attack.eps: {raw} is beyond the L2 diagonal of a {size}x{size} image in [0, 1] "
                        f"({diagonal:.1f}); L2 radii are in [0, 1] pixel units (0.5 is common on CIFAR)")


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise MrpfError(f"{key}: unknown value {value!r} (choose from {', '.join(map(str, choices))})")


def _within(key: str, value: float, raw: Any, low: float, high: float, closed_high: bool = False) -> None:
    if not (low < value <= high if closed_high else low < value < high):
        raise MrpfError(f"{key}: must lie in ({low:g}, {high:g}{']' if closed_high else ')'}, got {raw!r}")


def parse(raw: dict) -> Params:
    """Typed, checked parameters from merged plain data (every key present)."""
    from .models import check_arch  # lazily: keeps torch out of the planner (Snakefile, dvcyaml); no cycle

    if isinstance(raw["seed"], bool) or not isinstance(raw["seed"], int):
        raise MrpfError(f"seed: expected an integer, got {raw['seed']!r}")
    data = raw["data"]
    if data["train_path"] is None and data["dataset"] not in DATASETS:
        raise MrpfError(f"data.dataset: unknown dataset {data['dataset']!r} "
                        f"(choose from {', '.join(DATASETS)}, or set data.train_path to an .npz / ImageFolder)")
    check_arch(raw["model"]["arch"])
    _choice("attack.norm", raw["attack"]["norm"], NORMS)
    _choice("data.offline_set", raw["data"]["offline_set"], OFFLINE_SETS)
    _choice("train.method", raw["train"]["method"], TRAIN_METHODS)
    _choice("train.schedule", raw["train"]["schedule"], SCHEDULES)
    sections = {}
    for name, cls in SECTIONS.items():
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        sections[name] = cls(**{k: _convert(raw[name][k], hints[k], f"{name}.{k}") for k in hints})
    params = Params(seed=raw["seed"], **sections)

    attack, train, evaluate = params.attack, params.train, params.evaluate
    if attack.eps < 0:
        raise MrpfError(f"attack.eps: must be >= 0, got {raw['attack']['eps']!r}")
    _check_radius(attack, raw["attack"]["eps"], DATASETS.get(params.data.dataset))
    for key in ("lr", "momentum", "weight_decay", "gamma", "beta"):
        if getattr(train, key) < 0:
            raise MrpfError(f"train.{key}: must be >= 0, got {raw['train'][key]!r}")
    _check_reach(attack, "train.step_size", raw["train"]["step_size"], train.step_size, train.steps)
    _check_reach(attack, "evaluate.step_size", raw["evaluate"]["step_size"], evaluate.step_size, evaluate.pgd_steps)
    _check_reach(attack, "evaluate.step_size", raw["evaluate"]["step_size"], evaluate.step_size, train.val_pgd_steps)
    _choice("mrs.attack", params.mrs.attack, MRS_ATTACKS)
    _choice("mrs.signal", params.mrs.signal, MRS_SIGNALS)
    _choice("prune.method", params.prune.method, PRUNE_METHODS)
    _choice("prune.metric", params.prune.metric, BUDGET_METRICS)
    _choice("prune.finetune_method", params.prune.finetune_method, FINETUNE_METHODS)
    _choice("prune.allocation", params.prune.allocation, ALLOCATION_RULES)
    _choice("prune.score_ratios", params.prune.score_ratios, SCORE_RATIOS)
    if params.prune.score_lr <= 0:
        raise MrpfError(f"prune.score_lr: must be > 0, got {raw['prune']['score_lr']!r}")
    if params.prune.search_finetune_batches and params.prune.allocation != "joint_search":
        raise MrpfError(f"prune.search_finetune_batches: fine-tunes joint_search's candidates, so it needs "
                        f"prune.allocation: joint_search (got {params.prune.allocation!r})")
    curve = params.mrs.curve_ratios
    if not curve or any(not 0 < r < 1 for r in curve) or list(curve) != sorted(set(curve)):
        raise MrpfError(f"mrs.curve_ratios: ascending fractions in (0, 1), got {raw['mrs']['curve_ratios']!r}")
    _within("prune.sparsity", params.prune.sparsity, raw["prune"]["sparsity"], 0, 1)
    _within("mrs.probe_ratio", params.mrs.probe_ratio, raw["mrs"]["probe_ratio"], 0, 1, closed_high=True)
    _within("prune.r_max", params.prune.r_max, raw["prune"]["r_max"], 0, 1, closed_high=True)
    if train.ema_decay is not None:
        _within("train.ema_decay", train.ema_decay, raw["train"]["ema_decay"], 0, 1)
    unknown = sorted(set(evaluate.attacks) - set(EVALUATION_ATTACKS))
    if unknown:
        raise MrpfError(f"evaluate.attacks: unknown attack(s) {unknown} (choose from {', '.join(EVALUATION_ATTACKS)})")
    return params


def merge(base: dict, update: dict, prefix: str = "") -> None:
    """Update nested plain data in place; a key ``base`` lacks is an error naming it."""
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if not prefix and key in WORKFLOW_KEYS:
            continue
        if key not in base:
            raise MrpfError(f"unknown parameter '{dotted}' (known here: {', '.join(sorted(base))})")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise MrpfError(f"parameter '{dotted}' must be a mapping, got {value!r}")
            merge(base[key], value, dotted + ".")
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


def resolve_params(defaults: dict, raw: dict, overrides: list[dict]) -> dict:
    """One run's parameters as plain data: ``defaults``, then a params file's sections, then
    the active grid's ``params`` and ``dataset_params[data.dataset]`` (``grid``, or a
    ``grid=NAME`` override, picks the grid), then the overrides, which win over the grid."""
    params = copy.deepcopy(defaults)
    raw = dict(raw)
    grid_name, grids = raw.pop("grid", None), raw.pop("grids", None) or {}
    merge(params, raw)
    overrides = [copy.deepcopy(o) for o in overrides]
    for override in overrides:
        if "grid" in override:
            grid_name = override.pop("grid")
    if grid_name is not None:
        if grid_name not in grids:
            raise MrpfError(f"grid: unknown grid {grid_name!r} (params file defines: {', '.join(grids) or 'none'})")
        grid = grids[grid_name] or {}
        merge(params, copy.deepcopy(grid.get("params") or {}), f"grids.{grid_name}.params.")
        for override in overrides:
            merge(params, copy.deepcopy(override))
        dataset_params = (grid.get("dataset_params") or {}).get(params["data"]["dataset"]) or {}
        merge(params, copy.deepcopy(dataset_params), f"grids.{grid_name}.dataset_params.")
    for override in overrides:
        merge(params, override)
    return params


def load_params(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Params:
    """Defaults, updated by the params file (if any) and its active grid's parameters
    (``resolve_params``), then by dotted overrides (``grid=NAME`` picks the grid); parsed and
    checked once."""
    raw = read_yaml(path) if path is not None else {}
    return parse(resolve_params(DEFAULTS, raw, [parse_override(text) for text in overrides]))

