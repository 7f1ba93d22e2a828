# mrpf pipeline for Snakemake: `snakemake --cores all [--resources gpu=4] [--config grid=paper]`.
# The plan (stages, paths, commands) lives in mrpf/workflow.py and is shared with dvc.yaml;
# the rules here only call `mrpf` verbs. See README.md, "The pipeline".
import os
import re
from pathlib import Path

from mrpf import workflow as plan

configfile: "params.yaml"

# `snakemake --configfile FILE` plans with FILE (a complete params file) and every job reads it.
if len(workflow.overwrite_configfiles or []) > 1:
    raise ValueError("give one --configfile (a complete params file); every job reads that file")
PARAMS_FILE = os.path.relpath((workflow.overwrite_configfiles or ["params.yaml"])[0])
plan.validate_config(config, Path(workflow.basedir) / plan.SCHEMA, source=PARAMS_FILE)
GRID, GRID_SPEC = plan.active_grid(config)
GPUS = GRID_SPEC.get("gpus_per_job", 1)
RUNTIME = GRID_SPEC.get("runtime_min", {})
MEM_MB = GRID_SPEC.get("mem_mb", 4000)
THREADS = GRID_SPEC.get("threads", {})                # CPU threads per job (capped at --cores locally)
ROOT = plan.root(GRID_SPEC)                           # the grid's `out` folder ('' = here): logs go there too
# dense models of the grid's `imported` archs come from `mrpf import`, the others from `mrpf train`
IMPORTED = "|".join(re.escape(name) for name in plan.imported(GRID_SPEC)) or "(?!)"
IMPORTED_ARCH = f"(?:{IMPORTED})"
TRAINED_ARCH = f"(?!(?:{IMPORTED})/)[A-Za-z0-9_.:]+"     # arch is followed by / in every path


def cmd(stage):
    """The stage's `mrpf` command for a job's wildcards (mrpf.workflow.command)."""
    return lambda wildcards: plan.command(stage, PARAMS_FILE, GRID, GRID_SPEC, dict(wildcards.items()))


def inputs(stage):
    """The stage's inputs for a job's wildcards, from the plan that also writes dvc.yaml."""
    return lambda wildcards: plan.job(stage, dict(wildcards.items()), GRID_SPEC).deps


def outputs(stage):
    """The stage's outputs with {wildcards}, from the same plan."""
    return plan.pattern(stage, GRID_SPEC).outputs


wildcard_constraints:
    dataset="[a-z0-9]+",
    arch="[A-Za-z0-9_.:]+",
    tm="[a-z_]+",
    run=plan.RUN_NAME,
    model="dense|" + plan.RUN_NAME,


rule all:
    default_target: True
    input:
        plan.targets(config),


include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/mrs.smk"
include: "workflow/rules/prune.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
