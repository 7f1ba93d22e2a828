"""The experiment grid of params.yaml as one plan of jobs, shared by both engines.

params.yaml holds the hyperparameters (mrpf/config.py) plus two pipeline keys::

    grid: quick                 # the active grid
    grids:
      quick:
        datasets: [cifar10]     # x archs x train_methods x prune_methods x sparsities
        archs: [vgg11_w8]
        train_methods: [pgd_at]
        prune_methods: [mrpf, uniform_l1]
        sparsities: [0.5]
        gpus_per_job: 1         # resources: gpu=N of the GPU stages (0 on CPU-only clusters)
        params: {...}           # hyperparameters of this grid (over the top-level sections)
        dataset_params: {svhn: {...}}   # per dataset, over those

``jobs()`` expands the active grid into stages (data, train, evaluate, mrs, prune,
report) with their command, inputs, outputs, metrics and params. The Snakefile's rules
build their shell commands with ``command()``, and ``dvc_yaml()`` writes dvc.yaml from
the same plan, so the two engines run the same commands on the same files (a test
compares what each plans). Output layout::

    data/DATASET/{train,test}.npz
    results/DATASET/ARCH/TRAIN_METHOD/dense/       checkpoint.pt train_metrics.json history.csv eval.json
    results/DATASET/ARCH/TRAIN_METHOD/mrs/         mrs.json mrs.png
    results/DATASET/ARCH/TRAIN_METHOD/METHOD-S/    checkpoint.pt prune.json eval.json
    reports/                                       summary.md robustness.csv robustness.png
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from pathlib import Path
from typing import Any

import yaml

from .config import merge, read_yaml
from .errors import MrpfError

SCHEMA = "workflow/schemas/params.schema.yaml"

# The command of each stage; {placeholders} are the cell's fields (Snakemake fills them from
# wildcards, dvc.yaml from its foreach item). Every stage reads the params file and the grid.
COMMANDS = {
    "data": "mrpf data --params {params_file} grid={grid} --out data/{dataset} data.dataset={dataset}",
    "train": "mrpf train --params {params_file} grid={grid} --runs-dir results --run {dataset}/{arch}/{tm}/dense "
             "data.dataset={dataset} data.train_path=data/{dataset}/train.npz data.test_path=data/{dataset}/test.npz "
             "model.arch={arch} train.method={tm}",
    "evaluate": "mrpf evaluate --params {params_file} grid={grid} --runs-dir results "
                "--run {dataset}/{arch}/{tm}/{model} "
                "data.dataset={dataset} data.train_path=data/{dataset}/train.npz "
                "data.test_path=data/{dataset}/test.npz",
    "mrs": "mrpf mrs --params {params_file} grid={grid} --runs-dir results --run {dataset}/{arch}/{tm}/mrs "
           "--checkpoint results/{dataset}/{arch}/{tm}/dense/checkpoint.pt --sparsities {sparsities} "
           "data.dataset={dataset} data.train_path=data/{dataset}/train.npz data.test_path=data/{dataset}/test.npz "
           "train.method={tm}",
    "prune": "mrpf prune --params {params_file} grid={grid} --runs-dir results "
             "--run {dataset}/{arch}/{tm}/{pm}-{sparsity} "
             "--checkpoint results/{dataset}/{arch}/{tm}/dense/checkpoint.pt --method {pm} --sparsity {sparsity} "
             "data.dataset={dataset} data.train_path=data/{dataset}/train.npz data.test_path=data/{dataset}/test.npz "
             "train.method={tm} prune.finetune_method={tm}",
    "report": "mrpf report --params {params_file} grid={grid} --results results --out reports",
}

# params.yaml keys each stage reads (DVC ``params:``), besides the grid's own; what the
# command line sets (dataset, arch, methods, sparsity, data paths) is not repeated here.
_SPLITS = ["data.val_size", "data.calibration_size"]
_FINETUNE = ["prune.steps", "prune.finetune_epochs", "prune.final_epochs", "prune.finetune_lr", "prune.metric",
             "prune.r_max", "prune.round_to"]
STAGE_PARAMS = {
    "data": ["data"],
    "train": ["seed", "model", "attack", "train", "data.augment"] + _SPLITS,
    "evaluate": ["seed", "attack", "evaluate"],
    "mrs": ["seed", "attack", "mrs", "prune.sparsity", "prune.metric", "prune.alpha", "prune.r_max",
            "prune.cost_aware", "prune.round_to"] + _SPLITS,
    "report": [],
}
PRUNE_PARAMS = {  # per method: only what it reads, so a change reruns only the runs it touches
    "mrpf": ["mrs", "prune.alpha", "prune.cost_aware"],
    "mrpf_clean": ["mrs", "prune.alpha", "prune.cost_aware"],
    "taylor_adv": ["mrs.steps", "mrs.batch_size"],
    "uniform_l1": [], "global_magnitude": [], "random": [],
}


def stage_params(stage: str, method: str | None = None) -> list[str]:
    if stage != "prune":
        return STAGE_PARAMS[stage]
    return ["seed", "attack", "train", "data.augment"] + _SPLITS + _FINETUNE + PRUNE_PARAMS[method]


# The fields of each stage's cell (Snakemake wildcards, dvc.yaml foreach items).
CELL_FIELDS = {"data": ("dataset",), "train": ("dataset", "arch", "tm"), "mrs": ("dataset", "arch", "tm"),
               "prune": ("dataset", "arch", "tm", "pm", "sparsity"), "evaluate": ("dataset", "arch", "tm", "model"),
               "report": ()}
MRS_REUSE = "mrpf"   # the pruning method whose first step reads the mrs stage's mrs.json (same MRS settings)


@dataclasses.dataclass
class Job:
    stage: str
    cell: dict                          # the placeholders of COMMANDS[stage]
    deps: list[str]
    outs: list[str]                     # cached by DVC
    metrics: list[str] = dataclasses.field(default_factory=list)   # JSON, kept in Git
    plots: list[str] = dataclasses.field(default_factory=list)     # CSV/PNG, kept in Git
    kept: list[str] = dataclasses.field(default_factory=list)      # other small outputs kept in Git

    def command(self, params_file: str, grid_name: str, grid: dict) -> str:
        return command(self.stage, params_file, grid_name, grid, self.cell)

    @property
    def outputs(self) -> list[str]:
        return self.outs + self.metrics + self.plots + self.kept


def command(stage: str, params_file: str, grid_name: str, grid: dict, cell: dict) -> str:
    """The stage's ``mrpf`` command for one cell of grid ``grid_name``."""
    fields = dict(cell, params_file=params_file, grid=grid_name,
                  sparsities=",".join(sparsity_label(s) for s in grid["sparsities"]))
    text = COMMANDS[stage].format(**fields)
    if stage == "prune" and cell["pm"] == MRS_REUSE:
        text += f" --mrs {run_dir(cell['dataset'], cell['arch'], cell['tm'], 'mrs')}/mrs.json"
    return text


def pattern(stage: str) -> Job:
    """The job of ``stage`` with ``{field}`` wildcards in its paths (Snakemake's rules)."""
    return job(stage, {k: "{" + k + "}" for k in CELL_FIELDS[stage]})


def run_dir(dataset: str, arch: str, tm: str, model: str) -> str:
    return f"results/{dataset}/{arch}/{tm}/{model}"


def sparsity_label(value: Any) -> str:
    """Sparsities as they appear in paths and commands: 0.5, 0.7 (no trailing zeros)."""
    return format(float(value), "g")


def validate_config(config: dict, schema_path: str | Path = SCHEMA, source: str = "params.yaml") -> None:
    """Check params.yaml's structure against the JSON schema; the message names the bad key."""
    import jsonschema

    schema = yaml.safe_load(Path(schema_path).read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        raise MrpfError(f"{source}: {where}: {e.message}")
    name = config.get("grid")
    if name not in (config.get("grids") or {}):
        raise MrpfError(f"{source}: grid: unknown grid {name!r} (defined: {', '.join(config.get('grids') or {})})")


def active_grid(config: dict) -> tuple[str, dict]:
    name = config["grid"]
    return name, config["grids"][name]


def load_config(path: str | Path, overrides: list[str] | tuple = (), schema: str | Path | None = None) -> dict:
    """params.yaml as the pipeline sees it: ``grid=NAME`` (the only override here) applied,
    the structure validated against the schema beside it."""
    config = read_yaml(path)
    for text in overrides:
        key, _, value = text.partition("=")
        if key != "grid" or not value:
            raise MrpfError(f"only grid=NAME is accepted here, got {text!r}")
        config["grid"] = value
    validate_config(config, schema or Path(path).resolve().parent / SCHEMA, source=str(path))
    return config


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


def cells(config: dict) -> list[dict]:
    """Every (dataset, arch, train method) of the active grid."""
    _, grid = active_grid(config)
    return [dict(dataset=d, arch=a, tm=t)
            for d, a, t in itertools.product(grid["datasets"], grid["archs"], grid["train_methods"])]


def job(stage: str, cell: dict) -> Job:
    """The job of ``stage`` for one ``cell`` (a cell's fields may be ${item.*} placeholders)."""
    data = [f"data/{cell['dataset']}/train.npz", f"data/{cell['dataset']}/test.npz"]
    if stage == "data":
        return Job("data", cell, [], list(data))
    base = {k: cell[k] for k in ("dataset", "arch", "tm")}
    dense = run_dir(**base, model="dense")
    if stage == "train":
        return Job("train", cell, list(data), [f"{dense}/checkpoint.pt"], metrics=[f"{dense}/train_metrics.json"],
                   plots=[f"{dense}/history.csv"])
    if stage == "mrs":
        mrs = run_dir(**base, model="mrs")
        return Job("mrs", cell, data + [f"{dense}/checkpoint.pt"], [], kept=[f"{mrs}/mrs.json", f"{mrs}/mrs.png"])
    if stage == "prune":
        folder = run_dir(**base, model=f"{cell['pm']}-{cell['sparsity']}")
        mrs = [f"{run_dir(**base, model='mrs')}/mrs.json"] if cell["pm"] == MRS_REUSE else []
        return Job("prune", cell, data + [f"{dense}/checkpoint.pt"] + mrs, [f"{folder}/checkpoint.pt"],
                   kept=[f"{folder}/prune.json"])
    if stage == "evaluate":
        folder = run_dir(**base, model=cell["model"])
        return Job("evaluate", cell, data + [f"{folder}/checkpoint.pt"], [f"{folder}/eval_per_image.npz"],
                   metrics=[f"{folder}/eval.json"])
    raise ValueError(stage)


def jobs(config: dict) -> list[Job]:
    """The active grid's jobs, in dependency order, the report last."""
    _, grid = active_grid(config)
    plan = [job("data", {"dataset": d}) for d in grid["datasets"]]
    pruned = [(pm, sparsity_label(s)) for pm in grid["prune_methods"] for s in grid["sparsities"]]
    report_deps: list[str] = []
    for c in cells(config):
        plan.append(job("train", c))
        plan.append(job("mrs", c))
        plan += [job("prune", dict(c, pm=pm, sparsity=s)) for pm, s in pruned]
        for model in ["dense"] + [f"{pm}-{s}" for pm, s in pruned]:
            evaluation = job("evaluate", dict(c, model=model))
            plan.append(evaluation)
            report_deps += evaluation.outputs
    plan.append(Job("report", {}, report_deps, [], plots=["reports/robustness.csv", "reports/robustness.png"],
                    kept=["reports/summary.md"]))
    return plan


def targets(config: dict) -> list[str]:
    """What ``rule all`` asks for: every output of the plan."""
    return [path for job in jobs(config) for path in job.outputs]


def _dvc_stage(job: Job, params_file: str, grid_name: str, grid: dict) -> dict:
    stage: dict = {"cmd": job.command(params_file, grid_name, grid)}
    if job.deps:
        stage["deps"] = job.deps
    sections = stage_params(job.stage, job.cell.get("pm"))
    if job.stage != "report":
        sections = sections + [f"grids.{grid_name}.{key}" for key in ("params", "dataset_params") if grid.get(key)]
    if sections:
        stage["params"] = [{params_file: sections}] if params_file != "params.yaml" else sections
    outs = list(job.outs) + [{path: {"cache": False}} for path in job.kept]
    if outs:
        stage["outs"] = outs
    if job.metrics:
        stage["metrics"] = [{path: {"cache": False}} for path in job.metrics]
    if job.plots:
        stage["plots"] = [{path: {"cache": False}} for path in job.plots]
    return stage


def dvc_yaml(config: dict, params_file: str = "params.yaml") -> dict:
    """dvc.yaml for the active grid: one ``foreach`` stage per stage kind (and per pruning
    method, so that each depends only on the params it reads), items keyed by the cell."""
    grid_name, grid = active_grid(config)
    stages: dict = {}
    for planned in jobs(config):
        if planned.stage == "report":
            stages["report"] = _dvc_stage(planned, params_file, grid_name, grid)
            continue
        name = planned.stage if planned.stage != "prune" else f"prune_{planned.cell['pm']}"
        entry = stages.setdefault(name, {"foreach": {}, "do": None})
        entry["foreach"]["-".join(str(v) for v in planned.cell.values())] = dict(planned.cell)
        if entry["do"] is None:
            item = {k: "${item.%s}" % k for k in planned.cell}
            if planned.stage == "prune":
                item["pm"] = planned.cell["pm"]
            entry["do"] = _dvc_stage(job(planned.stage, item), params_file, grid_name, grid)
    plots = [{"reports/robustness.csv": {"x": "sparsity", "y": "pgd_acc", "template": "scatter",
                                         "title": "PGD accuracy vs sparsity (all methods)"}}]
    return {"stages": stages, "plots": plots}
