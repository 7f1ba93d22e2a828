"""params.yaml, its schema, the grid expansion and the two engines' plans."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from mrpf import workflow
from mrpf.config import DEFAULTS, load_params
from mrpf.errors import MrpfError

from .pipeline_project import IMPORTED_GRID, ROOT, TINY_GRID, make_project, run, write_foreign_weights

SCHEMA = ROOT / workflow.SCHEMA


def params_yaml() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_params_yaml_and_schema_list_every_hyperparameter_and_nothing_else():
    schema = yaml.safe_load(SCHEMA.read_text())["$defs"]["sections"]["properties"]
    params = params_yaml()
    for section, value in DEFAULTS.items():
        if isinstance(value, dict):
            assert set(schema[section]["properties"]) == set(value), section
            assert set(params[section]) == set(value), section
    assert set(params) - {"grid", "grids"} == set(DEFAULTS)


def test_every_list_of_names_follows_its_one_definition():
    """The schema's enums, the pipeline's per-method params and the CLI's help use config's lists."""
    from mrpf import config
    from mrpf.cli import build_parser
    from mrpf.config import FINETUNE_METHODS, TRAIN_METHODS

    schema = yaml.safe_load(SCHEMA.read_text())
    sections = schema["$defs"]["sections"]["properties"]
    enums = {("prune", "method"): config.PRUNE_METHODS, ("prune", "metric"): config.BUDGET_METRICS,
             ("attack", "norm"): config.NORMS, ("train", "schedule"): config.SCHEDULES,
             ("mrs", "attack"): config.MRS_ATTACKS, ("mrs", "signal"): config.MRS_SIGNALS,
             ("train", "method"): TRAIN_METHODS, ("prune", "finetune_method"): FINETUNE_METHODS,
             ("data", "offline_set"): config.OFFLINE_SETS}
    for (section, key), names in enums.items():
        assert tuple(sections[section]["properties"][key]["enum"]) == names, (section, key)
    assert tuple(sections["evaluate"]["properties"]["attacks"]["items"]["enum"]) == config.EVALUATION_ATTACKS
    grid = schema["$defs"]["grid"]["properties"]
    assert tuple(grid["prune_methods"]["allOf"][1]["items"]["enum"]) == config.PRUNE_METHODS
    assert tuple(grid["train_methods"]["allOf"][1]["items"]["enum"]) == TRAIN_METHODS
    assert set(workflow.PRUNE_PARAMS) == set(config.PRUNE_METHODS)
    from mrpf.data import OFFLINE_NAMES

    assert tuple(OFFLINE_NAMES) == config.OFFLINE_SETS
    prune_help = build_parser()._subparsers._group_actions[0].choices["prune"].format_help()
    assert ", ".join(config.PRUNE_METHODS) in " ".join(prune_help.split())


def test_params_yaml_validates_and_the_committed_dvc_yaml_is_the_generated_one(tmp_path):
    workflow.validate_config(params_yaml(), SCHEMA)
    shutil.copy(ROOT / "params.yaml", tmp_path)
    shutil.copytree(ROOT / "workflow", tmp_path / "workflow")
    run(["mrpf", "dvcyaml"], tmp_path)
    assert (tmp_path / "dvc.yaml").read_text() == (ROOT / "dvc.yaml").read_text(), \
        "dvc.yaml is stale: run `mrpf dvcyaml` and commit it"


@pytest.mark.parametrize("edit, named", [
    (lambda p: p["grids"]["quick"].update(sparsitys=[0.5]), "sparsitys"),
    (lambda p: p["grids"]["quick"].update(sparsities=[1.5]), "grids.quick.sparsities.0"),
    (lambda p: p["grids"]["quick"].update(datasets=["imagenet"]), "grids.quick.datasets"),
    (lambda p: p["grids"]["quick"]["params"]["train"].update(epoch=3), "epoch"),
    (lambda p: p["train"].update(lr_schedule="cosine"), "lr_schedule"),
    (lambda p: p.update(grid="nope"), "grid"),
    (lambda p: p["grids"]["paper"].pop("archs"), "archs"),
])
def test_a_bad_params_yaml_is_named(edit, named):
    params = params_yaml()
    edit(params)
    with pytest.raises(MrpfError, match=re.escape(named)):
        workflow.validate_config(params, SCHEMA)


def test_grid_params_apply_between_the_file_and_the_command_line(tmp_path):
    params = params_yaml()
    params["grids"]["paper"]["dataset_params"]["svhn"]["train"]["lr"] = 0.02
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    quick = load_params(path)
    assert quick.train.epochs == params["grids"]["quick"]["params"]["train"]["epochs"]
    paper_svhn = load_params(path, ["grid=paper", "data.dataset=svhn"])
    assert paper_svhn.train.epochs == 100 and paper_svhn.train.lr == 0.02
    assert load_params(path, ["grid=paper", "data.dataset=cifar10"]).train.lr == 0.1
    assert load_params(path, ["grid=paper", "data.dataset=svhn", "train.lr=0.5"]).train.lr == 0.5
    with pytest.raises(MrpfError, match="unknown grid 'nope'"):
        load_params(path, ["grid=nope"])


def test_every_paper_cell_has_valid_params():
    config = params_yaml()
    config["grid"] = "paper"
    plan = workflow.jobs(config)
    _, grid = workflow.active_grid(config)
    n_cells = len(grid["datasets"]) * len(grid["archs"]) * len(grid["train_methods"])
    n_pruned = n_cells * len(grid["prune_methods"]) * len(grid["sparsities"])
    assert len(plan) == len(grid["datasets"]) + 2 * n_cells + 2 * n_pruned + n_cells + 1
    for cell in workflow.cells(config):
        load_params(ROOT / "params.yaml", ["grid=paper", f"data.dataset={cell['dataset']}",
                                           f"model.arch={cell['arch']}", f"train.method={cell['tm']}"])


def snakemake_plan(folder: Path) -> set:
    """(command, outputs) of every job `snakemake -n -p -F` plans (logs and benchmarks aside)."""
    text = run(["snakemake", "-n", "-p", "-F", "--cores", "1"], folder).stdout
    planned = set()
    for block in text.split("\nrule ")[1:]:
        if block.startswith("all:"):
            continue
        outputs = re.search(r"^\s+output: (.*)$", block, re.M).group(1).split(", ")
        shell = re.search(r"^Shell command: (.*)$", block, re.M).group(1)
        command = re.search(r"(mrpf .*?) > \S+ 2>&1$", shell).group(1)
        planned.add((command, frozenset(outputs)))
    return planned


def dvc_plan(folder: Path) -> set:
    from dvc.repo import Repo

    with Repo(str(folder)) as repo:
        return {(stage.cmd, frozenset(str(out.def_path) for out in stage.outs)) for stage in repo.index.stages}


SEEDED_GRID = dict(TINY_GRID, seeds=[0, 1], out="experiments/seeded", extra_runs=[
    {"prune_methods": ["uniform_l1"], "sparsities": [0.7], "seeds": [0], "tag": "ft0",
     "params": {"prune": {"finetune_epochs": 0}, "evaluate": {"attacks": ["clean", "pgd"]}}},
    {"prune_methods": ["mrpf"], "sparsities": [0.7], "seeds": [0], "params": {"mrs": {"probe_ratio": 0.25}}}])


@pytest.mark.slow
@pytest.mark.parametrize("grid, jobs", [(TINY_GRID, 9), (SEEDED_GRID, 17), (IMPORTED_GRID, 7)],
                         ids=["tiny", "seeds-extra-out", "imported"])
def test_snakemake_and_dvc_plan_the_same_commands_and_outputs(tmp_path, grid, jobs):
    folder = make_project(tmp_path / "proj", grid=grid, git=False)
    write_foreign_weights(folder / "models" / "wrn.pth")
    smk, dvc = snakemake_plan(folder), dvc_plan(folder)
    assert len(smk) == jobs
    assert smk == dvc
    if grid is IMPORTED_GRID:   # the dense model is imported, not trained
        assert not any(command.startswith("mrpf train") for command, _ in smk)
        assert any(command.startswith("mrpf import") and "--arch wrn10_1 --weights models/wrn.pth --no-evaluate"
                   in command and command.endswith("--mean 0.4,0.5,0.6 --std 0.2,0.25,0.3") for command, _ in smk)


def test_imported_archs_must_be_archs_of_the_grid():
    config = {"grid": "g", "grids": {"g": dict(IMPORTED_GRID, archs=["vgg11_w8"])}}
    with pytest.raises(MrpfError, match="grids.g.imported.wrnimp: not one of the grid's archs"):
        workflow.validate_config(config, ROOT / workflow.SCHEMA)


def test_seeds_and_extra_runs_name_each_run_and_pass_its_overrides():
    runs = {run.name: run for run in workflow.pruned_runs(SEEDED_GRID)}
    assert set(runs) == {"mrpf-0.5-s0", "mrpf-0.5-s1", "uniform_l1-0.5-s0", "uniform_l1-0.5-s1",
                         "uniform_l1-0.7-s0-ft0", "mrpf-0.7-s0"}
    assert [r.name for r in workflow.pruned_runs(TINY_GRID)] == ["mrpf-0.5", "uniform_l1-0.5"]   # layout as before
    cell = {"dataset": "cifar10", "arch": "vgg11_w8", "tm": "pgd_at"}
    prune = workflow.command("prune", "params.yaml", "g", SEEDED_GRID, dict(cell, run="uniform_l1-0.7-s0-ft0"))
    assert prune.endswith(" seed=0 prune.finetune_epochs=0 evaluate.attacks=[clean,pgd]")
    assert "--runs-dir experiments/seeded/results " in prune and "--sparsity 0.7 " in prune
    evaluate = workflow.command("evaluate", "params.yaml", "g", SEEDED_GRID, dict(cell, model="uniform_l1-0.7-s0-ft0"))
    assert "seed=" not in evaluate   # every run meets the same evaluation attack starts
    assert evaluate.endswith(" prune.finetune_epochs=0 evaluate.attacks=[clean,pgd]")
    seeded = workflow.command("prune", "params.yaml", "g", SEEDED_GRID, dict(cell, run="mrpf-0.5-s1"))
    assert "--mrs experiments/seeded/results/cifar10/vgg11_w8/pgd_at/mrs/mrs.json" in seeded
    remeasured = workflow.command("prune", "params.yaml", "g", SEEDED_GRID, dict(cell, run="mrpf-0.7-s0"))
    assert "--mrs" not in remeasured and remeasured.endswith("seed=0 mrs.probe_ratio=0.25")
    twice = dict(SEEDED_GRID, extra_runs=[{"prune_methods": ["mrpf"], "sparsities": [0.5], "seeds": [1]}])
    with pytest.raises(MrpfError, match="pruned run mrpf-0.5-s1 is listed twice"):
        workflow.pruned_runs(twice)


def test_dense_in_git_keeps_the_dense_checkpoint_in_git_and_the_others_in_the_dvc_cache():
    cell = {"dataset": "cifar10", "arch": "vgg11_w8", "tm": "pgd_at"}
    dense = "results/cifar10/vgg11_w8/pgd_at/dense/checkpoint.pt"
    cached = workflow._dvc_stage(workflow.job("train", cell, TINY_GRID), "params.yaml", "tiny", TINY_GRID)
    assert dense in cached["outs"]
    grid = dict(TINY_GRID, dense_in_git=True)
    kept = workflow._dvc_stage(workflow.job("train", cell, grid), "params.yaml", "tiny", grid)
    assert {dense: {"cache": False}} in kept["outs"] and dense not in kept["outs"]
    pruned = workflow.job("prune", dict(cell, run="mrpf-0.5"), grid)
    assert pruned.outs == ["results/cifar10/vgg11_w8/pgd_at/mrpf-0.5/checkpoint.pt"]   # pruned ones stay cached
    evaluated = workflow._dvc_stage(workflow.job("evaluate", dict(cell, model="mrpf-0.5"), grid), "params.yaml",
                                    "tiny", grid)
    assert evaluated["outs"] == [{"results/cifar10/vgg11_w8/pgd_at/mrpf-0.5/eval_per_image.npz": {"cache": False}}]


def test_snakemake_jobs_read_the_params_file_snakemake_was_given(tmp_path):
    """`snakemake --configfile other.yaml` plans with other.yaml and passes it to every job."""
    folder = make_project(tmp_path / "proj", git=False)
    shutil.copy(folder / "params.yaml", folder / "other.yaml")
    text = run(["snakemake", "-n", "-p", "-F", "--cores", "1", "--configfile", "other.yaml"], folder).stdout
    commands = re.findall(r"(mrpf \w+ --params \S+)", text)
    assert len(commands) >= 9
    assert all("--params other.yaml" in c for c in commands), commands


@pytest.mark.parametrize("root", ["", "experiments/evidence/"])
def test_the_scratch_a_prune_run_leaves_in_its_folder_is_ignored_by_git(root):
    """The step checkpoints and the latency table cache (mrpf.latency.TABLE_FILE) are scratch,
    not outputs of any stage: `git status` must not list them after a grid ran."""
    from mrpf.latency import TABLE_FILE

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout of the project")
    run_dir = f"{root}results/cifar10/vgg11_w2/pgd_at/mrpf-0.7-s0-lat"
    for scratch in (f"{run_dir}/{TABLE_FILE}", f"{run_dir}/step1/checkpoint.pt"):
        done = run(["git", "check-ignore", "-q", "--no-index", scratch], ROOT, check=False)
        assert done.returncode == 0, f"{scratch} is not ignored"
