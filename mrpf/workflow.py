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
        seeds: [0, 1, 2]        # optional: fine-tuning seeds, one pruned run each (METHOD-S-sSEED/)
        extra_runs:             # optional: more pruned runs, each block its own product
          - {prune_methods: [random], sparsities: [0.9], seeds: [0]}
          - {prune_methods: [mrpf], sparsities: [0.9], seeds: [0], tag: ft20,     # METHOD-S-sSEED-TAG/
             params: {prune: {final_epochs: 17}}}     # command-line overrides of these runs
        out: experiments/NAME   # optional: the grid's data/ results/ reports/ logs/ live here
        imported:               # optional: dense models imported (mrpf import), not trained, by arch name
          rn18_tv: {arch: "tv:resnet18", weights: models/rn18.pth, mean: [...], std: [...]}
        gpus_per_job: 1         # resources: gpu=N of the GPU stages (0 on CPU-only clusters)
        params: {...}           # hyperparameters of this grid (over the top-level sections)
        dataset_params: {svhn: {...}}   # per dataset, over those

``jobs()`` expands the active grid into stages (data, train or import, evaluate, mrs,
prune, report) with their command, inputs, outputs, metrics and params. The Snakefile's rules
build their shell commands with ``command()``, and ``dvc_yaml()`` writes dvc.yaml from
the same plan, so the two engines run the same commands on the same files (a test
compares what each plans). Output layout (under the grid's ``out`` folder, if it has one)::

    data/DATASET/{train,test}.npz
    results/DATASET/ARCH/TRAIN_METHOD/dense/       checkpoint.pt train_metrics.json history.csv eval.json
    results/DATASET/ARCH/TRAIN_METHOD/mrs/         mrs.json mrs.png
    results/DATASET/ARCH/TRAIN_METHOD/RUN/         checkpoint.pt prune.json eval.json
    reports/                                       summary.md robustness.csv robustness.png

where RUN is METHOD-S, METHOD-S-sSEED with seeds and METHOD-S-sSEED-TAG for a tagged
block of ``extra_runs`` (``PrunedRun.name``).
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import yaml

from .config import read_yaml
from .errors import MrpfError

SCHEMA = "workflow/schemas/params.schema.yaml"

# The command of each stage; {placeholders} are the cell's fields (Snakemake fills them from
# wildcards, dvc.yaml from its foreach item). Every stage reads the params file and the grid.
_DATA = ("data.dataset={dataset} data.train_path={root}data/{dataset}/train.npz "
         "data.test_path={root}data/{dataset}/test.npz")
COMMANDS = {
    "data": "mrpf data --params {params_file} grid={grid} --out {root}data/{dataset} data.dataset={dataset}",
    "train": "mrpf train --params {params_file} grid={grid} --runs-dir {root}results "
             "--run {dataset}/{arch}/{tm}/dense " + _DATA + " model.arch={arch} train.method={tm}",
    "import": "mrpf import --params {params_file} grid={grid} --runs-dir {root}results "
              "--run {dataset}/{arch}/{tm}/dense --arch {source} --weights {weights} --no-evaluate "
              + _DATA + "{normalisation}",
    "evaluate": "mrpf evaluate --params {params_file} grid={grid} --runs-dir {root}results "
                "--run {dataset}/{arch}/{tm}/{model} " + _DATA,
    "mrs": "mrpf mrs --params {params_file} grid={grid} --runs-dir {root}results --run {dataset}/{arch}/{tm}/mrs "
           "--checkpoint {root}results/{dataset}/{arch}/{tm}/dense/checkpoint.pt --sparsities {sparsities} "
           + _DATA + " train.method={tm}",
    "prune": "mrpf prune --params {params_file} grid={grid} --runs-dir {root}results "
             "--run {dataset}/{arch}/{tm}/{run} "
             "--checkpoint {root}results/{dataset}/{arch}/{tm}/dense/checkpoint.pt --method {pm} --sparsity {sparsity} "
             + _DATA + " train.method={tm} prune.finetune_method={ft}",
    "report": "mrpf report --params {params_file} grid={grid} --results {root}results --out {root}reports",
}

# params.yaml keys each stage reads (DVC ``params:``), besides the grid's own; what the
# command line sets (dataset, arch, methods, sparsity, data paths) is not repeated here.
_SPLITS = ["data.val_size", "data.calibration_size"]
_FINETUNE = ["prune.steps", "prune.finetune_epochs", "prune.final_epochs", "prune.finetune_lr", "prune.metric",
             "prune.r_max", "prune.round_to"]
STAGE_PARAMS = {
    "data": ["data"],
    "train": ["seed", "model", "attack", "train", "data.augment"] + _SPLITS,
    "import": ["model.activation"],
    "evaluate": ["seed", "attack", "evaluate"],
    "mrs": ["seed", "attack", "mrs", "prune.sparsity", "prune.metric", "prune.allocation", "prune.alpha",
            "prune.r_max", "prune.cost_aware", "prune.round_to"] + _SPLITS,
    "report": [],
}
PRUNE_PARAMS = {  # per method: only what it reads, so a change reruns only the runs it touches
    "mrpf": ["mrs", "prune.allocation", "prune.alpha", "prune.cost_aware", "prune.search_finetune_batches"],
    "mrpf_clean": ["mrs", "prune.allocation", "prune.alpha", "prune.cost_aware", "prune.search_finetune_batches"],
    "taylor_adv": ["mrs.steps", "mrs.batch_size"],
    "uniform_l1": [], "global_magnitude": [], "random": [],
    "hydra": ["prune.score_epochs", "prune.score_ratios", "prune.score_lr", "mrs", "prune.allocation", "prune.alpha",
              "prune.cost_aware", "prune.search_finetune_batches"],
    "harp": ["prune.score_epochs", "prune.score_lr"],
}


def stage_params(stage: str, method: str | None = None) -> list[str]:
    if stage != "prune":
        return STAGE_PARAMS[stage]
    return ["seed", "attack", "train", "data.augment"] + _SPLITS + _FINETUNE + PRUNE_PARAMS[method]


# The fields of each stage's cell (Snakemake wildcards, dvc.yaml foreach keys). A pruned
# run's method, sparsity and overrides follow from its name (``pruned_runs``).
CELL_FIELDS = {"data": ("dataset",), "train": ("dataset", "arch", "tm"), "import": ("dataset", "arch", "tm"),
               "mrs": ("dataset", "arch", "tm"),
               "prune": ("dataset", "arch", "tm", "run"), "evaluate": ("dataset", "arch", "tm", "model"),
               "report": ()}
MRS_REUSE = "mrpf"   # the pruning method whose first step reads the mrs stage's mrs.json (same MRS settings)
RUN_NAME = r"[a-z_0-9]+-0\.[0-9]+(?:-s[0-9]+)?(?:-[a-z0-9]+)?"   # PrunedRun.name (Snakemake's wildcards)
_MRS_KEYS = ("mrs.", "attack.", "data.calibration_size", "data.val_size",   # overrides that change what
             "prune.allocation")                                             # step 1 measures


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


@dataclasses.dataclass(frozen=True)
class PrunedRun:
    """One pruned model of a grid: method, sparsity, fine-tuning seed and a block's overrides."""

    pm: str
    sparsity: str                       # as in paths (sparsity_label)
    seed: int | None = None             # None: the grid lists no seeds (the params' seed)
    tag: str | None = None              # names an extra_runs block with its own overrides
    overrides: tuple[str, ...] = ()     # KEY=VALUE of the block's params, after the grid's

    @property
    def name(self) -> str:
        return "-".join([self.pm, self.sparsity] + ([f"s{self.seed}"] if self.seed is not None else [])
                        + ([self.tag] if self.tag else []))

    @property
    def reuses_mrs(self) -> bool:
        """Whether step 1 reads the mrs stage's mrs.json: MRPF with the grid's MRS settings."""
        return self.pm == MRS_REUSE and not any(o.startswith(_MRS_KEYS) for o in self.overrides)

    def extra(self, stage: str) -> str:
        """Command-line overrides of this run: the seed fine-tunes (prune only; evaluation
        keeps the params' seed, so every run meets the same attack starts), then the block's."""
        seed = [f"seed={self.seed}"] if stage == "prune" and self.seed is not None else []
        return " ".join(seed + list(self.overrides))


def _override_text(prefix: str, value: Any) -> list[str]:
    """``params`` of an extra_runs block as command-line overrides (``prune.final_epochs=17``)."""
    if isinstance(value, dict):
        return [t for key, sub in value.items() for t in _override_text(f"{prefix}{key}.", sub)]
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, list):
        text = "[" + ",".join(str(v) for v in value) + "]"
    else:
        text = "null" if value is None else str(value)
    return [f"{prefix[:-1]}={text}"]


def pruned_runs(grid: dict) -> list[PrunedRun]:
    """The grid's pruned runs: prune_methods x sparsities x seeds, then each ``extra_runs``
    block's own product (its seeds default to the grid's); names must not repeat."""
    runs: dict[str, PrunedRun] = {}
    for block in blocks(grid):
        seeds = block.get("seeds", grid.get("seeds")) or [None]
        overrides = tuple(_override_text("", block.get("params") or {})) if block is not grid else ()
        for pm, sparsity, seed in itertools.product(block["prune_methods"], block["sparsities"], seeds):
            run = PrunedRun(pm, sparsity_label(sparsity), seed, block.get("tag") if block is not grid else None,
                            overrides)
            if run.name in runs:
                raise MrpfError(f"grid: pruned run {run.name} is listed twice (give the extra_runs block a tag)")
            runs[run.name] = run
    return list(runs.values())


def blocks(grid: dict) -> list[dict]:
    """The grid's own block (prune_methods x sparsities x seeds), then its extra_runs."""
    return [grid] + list(grid.get("extra_runs") or [])


def baseline_tags(grid: dict) -> dict:
    """For each block's tag, the tag of the uniform_l1 runs its runs are compared with: the
    block's ``baseline_tag`` if given, else its own tag where the block prunes uniform_l1 too,
    else the grid's own runs (None)."""
    out: dict = {None: None}
    for block in blocks(grid)[1:]:
        tag = block.get("tag")
        own = tag if "uniform_l1" in block["prune_methods"] else None
        out.setdefault(tag, block.get("baseline_tag", own))
    return out


def control_tag(grid: dict) -> str | None:
    """The tag of the uniform_l1 block every untagged run is also compared with (``control_tag``);
    a tag no block of uniform_l1 runs carries is an error."""
    tag = grid.get("control_tag")
    if tag is not None and not any(b.get("tag") == tag and "uniform_l1" in b["prune_methods"]
                                   for b in blocks(grid)[1:]):
        raise MrpfError(f"control_tag: no extra_runs block with tag {tag!r} prunes uniform_l1")
    return tag


def imported(grid: dict) -> dict[str, dict]:
    """The grid's imported dense models by the arch name the grid lists them under."""
    return dict(grid.get("imported") or {})


def import_fields(grid: dict, arch: str) -> dict:
    """The ``mrpf import`` arguments of an imported arch (its command's and dvc.yaml item's fields)."""
    spec = imported(grid)[arch]
    norm = "".join(f" --{k} {','.join(str(v) for v in spec[k])}" for k in ("mean", "std") if spec.get(k))
    return {"source": spec["arch"], "weights": spec["weights"], "normalisation": norm}


def dense_stage(grid: dict, arch: str) -> str:
    """Where a cell's dense model comes from: ``import`` for the grid's imported archs, else ``train``."""
    return "import" if arch in imported(grid) else "train"


def grid_sparsities(grid: dict) -> list[str]:
    """Every sparsity a grid prunes to, ascending (the mrs stage charts each)."""
    return sorted({run.sparsity for run in pruned_runs(grid)}, key=float)


def root(grid: dict) -> str:
    """The folder holding a grid's data/, results/, reports/, logs/ ('' = the repository root)."""
    out = str(grid.get("out") or "").strip("/")
    return "" if out in ("", ".") else out + "/"


def command(stage: str, params_file: str, grid_name: str, grid: dict, cell: dict) -> str:
    """The stage's ``mrpf`` command for one cell of grid ``grid_name``. A pruned run's
    method, sparsity and overrides come from the cell where it has them (dvc.yaml's
    templates), else from the grid by the run's name (Snakemake's wildcards)."""
    fields = dict(cell, params_file=params_file, grid=grid_name, root=root(grid),
                  sparsities=",".join(grid_sparsities(grid)),
                  ft=((grid.get("params") or {}).get("prune") or {}).get("finetune_method") or cell.get("tm"))
    run = None
    if stage == "import" and cell["arch"] in imported(grid):
        fields = dict(import_fields(grid, cell["arch"]), **fields)
    if stage in ("prune", "evaluate"):
        name = cell["run"] if stage == "prune" else cell["model"]
        run = {r.name: r for r in pruned_runs(grid)}.get(name)
        fields.setdefault("pm", run.pm if run else None)
        fields.setdefault("sparsity", run.sparsity if run else None)
        fields.setdefault("extra", run.extra(stage) if run else "")
    text = COMMANDS[stage].format(**fields)
    reuse = run.reuses_mrs if run is not None else cell.get("reuse_mrs", True)
    if stage == "prune" and fields["pm"] == MRS_REUSE and reuse:
        text += f" --mrs {run_dir(grid, cell['dataset'], cell['arch'], cell['tm'], 'mrs')}/mrs.json"
    if fields.get("extra"):
        text += " " + fields["extra"]
    return text


def pattern(stage: str, grid: dict) -> Job:
    """The job of ``stage`` with ``{field}`` wildcards in its paths (Snakemake's rules)."""
    return job(stage, {k: "{" + k + "}" for k in CELL_FIELDS[stage]}, grid)


def run_dir(grid: dict, dataset: str, arch: str, tm: str, model: str) -> str:
    return f"{root(grid)}results/{dataset}/{arch}/{tm}/{model}"


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
    for grid_name, grid in config["grids"].items():
        try:
            pruned_runs(grid)
            control_tag(grid)
        except MrpfError as e:
            raise MrpfError(f"{source}: grids.{grid_name}.{e}") from None
        for name in imported(grid):
            if name not in grid["archs"]:
                raise MrpfError(f"{source}: grids.{grid_name}.imported.{name}: not one of the grid's archs "
                                f"({', '.join(grid['archs'])})")


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




def cells(config: dict) -> list[dict]:
    """Every (dataset, arch, train method) of the active grid."""
    _, grid = active_grid(config)
    return [dict(dataset=d, arch=a, tm=t)
            for d, a, t in itertools.product(grid["datasets"], grid["archs"], grid["train_methods"])]


def job(stage: str, cell: dict, grid: dict) -> Job:
    """The job of ``stage`` for one ``cell`` (a cell's fields may be ${item.*} placeholders)."""
    top = root(grid)
    data = [f"{top}data/{cell['dataset']}/train.npz", f"{top}data/{cell['dataset']}/test.npz"]
    if stage == "data":
        return Job("data", cell, [], list(data))
    base = {k: cell[k] for k in ("dataset", "arch", "tm")}
    dense = run_dir(grid, **base, model="dense")
    if stage == "train":
        checkpoint = [f"{dense}/checkpoint.pt"]
        in_git = bool(grid.get("dense_in_git"))
        return Job("train", cell, list(data), [] if in_git else checkpoint, metrics=[f"{dense}/train_metrics.json"],
                   plots=[f"{dense}/history.csv"], kept=checkpoint if in_git else [])
    if stage == "import":
        weights = cell.get("weights") or imported(grid).get(cell["arch"], {}).get("weights")
        return Job("import", cell, data + ([weights] if weights else []), [f"{dense}/checkpoint.pt"])
    if stage == "mrs":
        mrs = run_dir(grid, **base, model="mrs")
        return Job("mrs", cell, data + [f"{dense}/checkpoint.pt"], [], kept=[f"{mrs}/mrs.json", f"{mrs}/mrs.png"])
    if stage == "prune":
        folder = run_dir(grid, **base, model=cell["run"])
        run = {r.name: r for r in pruned_runs(grid)}.get(cell["run"])
        reuse = run.reuses_mrs if run is not None else cell.get("pm") == MRS_REUSE and cell.get("reuse_mrs", True)
        mrs = [f"{run_dir(grid, **base, model='mrs')}/mrs.json"] if reuse else []
        return Job("prune", cell, data + [f"{dense}/checkpoint.pt"] + mrs, [f"{folder}/checkpoint.pt"],
                   kept=[f"{folder}/prune.json"])
    if stage == "evaluate":
        folder = run_dir(grid, **base, model=cell["model"])
        # the per-image outcomes are kept in Git: they are what `mrpf report`'s intervals are
        # computed from (a few kB), so any clone regenerates the report without the DVC cache
        return Job("evaluate", cell, data + [f"{folder}/checkpoint.pt"], [], metrics=[f"{folder}/eval.json"],
                   kept=[f"{folder}/eval_per_image.npz"])
    raise ValueError(stage)


def jobs(config: dict) -> list[Job]:
    """The active grid's jobs, in dependency order, the report last."""
    _, grid = active_grid(config)
    top = root(grid)
    plan = [job("data", {"dataset": d}, grid) for d in grid["datasets"]]
    runs = pruned_runs(grid)
    report_deps: list[str] = []
    for c in cells(config):
        stage = dense_stage(grid, c["arch"])
        plan.append(job(stage, dict(c, **(import_fields(grid, c["arch"]) if stage == "import" else {})), grid))
        plan.append(job("mrs", c, grid))
        plan += [job("prune", dict(c, run=run.name), grid) for run in runs]
        for model in ["dense"] + [run.name for run in runs]:
            evaluation = job("evaluate", dict(c, model=model), grid)
            plan.append(evaluation)
            report_deps += evaluation.outputs
    reports = f"{top}reports"
    plan.append(Job("report", {}, report_deps, [], plots=[f"{reports}/robustness.csv", f"{reports}/robustness.png"],
                    kept=[f"{reports}/summary.md"]))
    return plan


def targets(config: dict) -> list[str]:
    """What ``rule all`` asks for: every output of the plan."""
    return [path for job in jobs(config) for path in job.outputs]


def _dvc_stage(job: Job, params_file: str, grid_name: str, grid: dict) -> dict:
    stage: dict = {"cmd": job.command(params_file, grid_name, grid)}
    if root(grid):
        stage["wdir"] = "/".join([".."] * len(root(grid).strip("/").split("/")))
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


def dvc_yaml_path(grid: dict) -> str:
    """Where a grid's dvc.yaml lives: the repository root, or its ``out`` folder (whose
    stages run from the root, ``wdir``), so ``dvc repro`` at the root runs the active grid only."""
    return f"{root(grid)}dvc.yaml"


def dvc_yaml(config: dict, params_file: str = "params.yaml") -> dict:
    """dvc.yaml for the active grid: one ``foreach`` stage per stage kind (and per pruning
    method, so that each depends only on the params it reads), items keyed by the cell.
    A pruned run's method, sparsity and overrides are fields of its item."""
    grid_name, grid = active_grid(config)
    runs = {run.name: run for run in pruned_runs(grid)}
    stages: dict = {}
    for planned in jobs(config):
        if planned.stage == "report":
            stages["report"] = _dvc_stage(planned, params_file, grid_name, grid)
            continue
        item = dict(planned.cell)
        run = runs.get(item.get("run") if planned.stage == "prune" else item.get("model"))
        name = planned.stage
        if planned.stage == "prune":   # one stage per method (and MRS reuse): the params each reads
            name = f"prune_{run.pm}" + ("_remeasured" if run.pm == MRS_REUSE and not run.reuses_mrs else "")
            item.update(pm=run.pm, sparsity=run.sparsity)
        if run is not None and run.extra(planned.stage):   # runs with overrides: a stage of their own
            item["extra"] = run.extra(planned.stage)
            name += "_overrides"
        entry = stages.setdefault(name, {"foreach": {}, "do": None})
        entry["foreach"]["-".join(str(planned.cell[k]) for k in CELL_FIELDS[planned.stage])] = item
    for name, entry in stages.items():
        if name == "report":
            continue
        stage = name.removesuffix("_overrides")
        stage = "prune" if stage.startswith("prune_") else stage
        template = {k: "${item.%s}" % k for k in next(iter(entry["foreach"].values()))}
        if stage == "prune":
            method = name.removeprefix("prune_").removesuffix("_overrides")
            template.update(pm=method.removesuffix("_remeasured"), reuse_mrs=not method.endswith("_remeasured"))
        entry["do"] = _dvc_stage(job(stage, template, grid), params_file, grid_name, grid)
    plots = [{"reports/robustness.csv": {   # top-level plots are relative to dvc.yaml, not wdir
 "x": "sparsity", "y": "pgd_acc", "template": "scatter",
                                                      "title": "PGD accuracy vs sparsity (all methods)"}}]
    return {"stages": stages, "plots": plots}
