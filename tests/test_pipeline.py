"""The pipeline end to end on the tiny grid: Snakemake runs it, DVC takes it over,
versions it in a local remote, and `dvc metrics diff` shows what a params change touched."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from .pipeline_project import make_project, run

pytestmark = pytest.mark.slow

RUN = "results/cifar10/vgg11_w8/pgd_at"


def digest(folder: Path, paths: list[str]) -> dict:
    return {p: hashlib.sha256((folder / p).read_bytes()).hexdigest() for p in paths}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """The tiny grid, run by Snakemake, then recorded by `dvc commit` and committed to Git."""
    folder = make_project(tmp_path_factory.mktemp("pipeline") / "proj")
    run(["snakemake", "--cores", "2"], folder)
    run(["dvc", "commit", "-f"], folder)
    run("git add -A && git commit -qm 'tiny grid'", folder)
    return folder


def test_snakemake_run_then_dvc_commit_leaves_nothing_to_do(pipeline):
    summary = (pipeline / "reports/summary.md").read_text()
    assert "| mrpf " in summary and "| uniform_l1 " in summary and "(baseline)" in summary
    for model in ("dense", "mrpf-0.5", "uniform_l1-0.5"):
        metrics = json.loads((pipeline / RUN / model / "eval.json").read_text())
        assert {"clean_acc", "fgsm_acc", "pgd_acc", "cw_acc", "macs", "params"} <= set(metrics)
    status = run(["dvc", "status"], pipeline).stdout
    assert "up to date" in status, status
    dry = run(["dvc", "repro", "--dry"], pipeline).stdout
    assert "Running stage" not in dry, dry
    assert run(["git", "status", "--porcelain"], pipeline).stdout.strip() == ""


def test_push_wipe_pull_restores_checkpoints_and_metrics_byte_identical(pipeline, tmp_path):
    folder = tmp_path / "clone"
    shutil.copytree(pipeline, folder, symlinks=True)
    run(["dvc", "remote", "add", "-d", "local", str(tmp_path / "remote")], folder)
    run("git commit -qam 'local remote'", folder)
    cached = [f"{RUN}/{m}/checkpoint.pt" for m in ("dense", "mrpf-0.5", "uniform_l1-0.5")] + [
        "data/cifar10/train.npz"]
    metrics = [f"{RUN}/{m}/eval.json" for m in ("dense", "mrpf-0.5", "uniform_l1-0.5")] + [
        f"{RUN}/dense/train_metrics.json", f"{RUN}/mrpf-0.5/eval_per_image.npz"]
    before = digest(folder, cached + metrics)
    run(["dvc", "push"], folder)
    shutil.rmtree(folder / ".dvc" / "cache")
    shutil.rmtree(folder / "results")
    shutil.rmtree(folder / "data")
    run(["git", "checkout", "--", "."], folder)      # metrics and per-image outcomes (cache: false) live in Git
    run(["dvc", "pull"], folder)                     # checkpoints and data come from the remote
    assert digest(folder, cached + metrics) == before
    assert "up to date" in run(["dvc", "status"], folder).stdout


def test_a_git_clone_without_checkpoints_or_dvc_cache_regenerates_the_same_report(pipeline, tmp_path):
    """eval.json and the per-image outcomes live in Git, so `mrpf report` on a plain clone
    writes the report the pipeline wrote, intervals included, with no checkpoint at hand."""
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(pipeline), str(clone)], tmp_path)
    assert not (clone / RUN / "mrpf-0.5/checkpoint.pt").exists()
    run(["mrpf", "report", "--params", "params.yaml", "--results", "results", "--out", "again"], clone)
    summary = (clone / "again/summary.md").read_text()
    assert summary == (pipeline / "reports/summary.md").read_text()
    assert "[" in summary.split("| mrpf ")[1].splitlines()[0]      # mrpf's row carries its interval


def test_metrics_diff_shows_exactly_the_runs_a_params_change_touched(pipeline, tmp_path):
    folder = tmp_path / "exp"
    shutil.copytree(pipeline, folder, symlinks=True)
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["mrs"]["probe_ratio"] = 0.25           # read by MRS and mrpf pruning only
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    reran = run(["dvc", "repro"], folder).stdout
    assert "Running stage 'prune_mrpf@" in reran
    assert "Running stage 'prune_uniform_l1@" not in reran and "Running stage 'train@" not in reran
    run("git add -A && git commit -qm 'probe ratio 0.25'", folder)
    diff = json.loads(run(["dvc", "metrics", "diff", "HEAD~1", "--json"], folder).stdout)
    assert set(diff) == {f"{RUN}/mrpf-0.5/eval.json"}, diff


def test_a_killed_job_reruns_through_the_same_snakemake_target_to_the_same_result(pipeline, tmp_path):
    """SIGKILL `mrpf train` mid-epoch under Snakemake (fault injection), rerun the target:
    training resumes from its last complete epoch and ends where the uninterrupted run did."""
    import os

    from .test_kill import without_timing

    folder = make_project(tmp_path / "proj", git=False)
    target = f"{RUN}/dense/eval.json"
    os.environ["MRPF_CRASH_AT"] = "batch:3"
    try:
        failed = run(["snakemake", "--cores", "1", target], folder, check=False)
    finally:
        del os.environ["MRPF_CRASH_AT"]
    assert failed.returncode != 0
    assert not (folder / RUN / "dense/checkpoint.pt").exists()
    run(["snakemake", "--cores", "1", target], folder)
    log = (folder / "logs/train/cifar10/vgg11_w8/pgd_at.log").read_text()
    for name in ("train_metrics.json", "eval.json"):
        mine = json.loads((folder / RUN / "dense" / name).read_text())
        ref = json.loads((pipeline / RUN / "dense" / name).read_text())
        assert without_timing(mine) == without_timing(ref), (name, log[-2000:])


def test_two_snakemake_invocations_on_one_directory_do_not_corrupt_outputs(pipeline, tmp_path):
    """The second invocation is refused while the first runs: by Snakemake's directory lock, or,
    when it reaches them first, by the markers of the jobs the first is running (Snakemake checks
    for incomplete outputs before it takes the lock); the first finishes with outputs equal to an
    undisturbed run's."""
    import subprocess
    import time

    from .pipeline_project import env
    from .test_kill import without_timing

    folder = make_project(tmp_path / "proj", git=False)
    first = subprocess.Popen(["snakemake", "--cores", "1"], cwd=folder, env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    for _ in range(600):
        if (folder / "logs").exists():
            break
        time.sleep(0.1)
    second = run(["snakemake", "--cores", "1"], folder, check=False)
    out = first.communicate(timeout=900)[0]
    assert first.returncode == 0, out[-3000:]
    refusal = (second.stdout + second.stderr).lower()
    assert second.returncode != 0 and ("lock" in refusal or "incomplete files" in refusal), refusal[-2000:]
    for model in ("dense", "mrpf-0.5", "uniform_l1-0.5"):
        mine = json.loads((folder / RUN / model / "eval.json").read_text())
        ref = json.loads((pipeline / RUN / model / "eval.json").read_text())
        assert without_timing({k: v for k, v in mine.items() if k != "checkpoint"}) == \
            without_timing({k: v for k, v in ref.items() if k != "checkpoint"})


def test_a_params_change_as_a_dvc_experiment_reruns_only_the_stages_that_read_it(pipeline, tmp_path):
    """`dvc exp run -S KEY=VALUE` is how an ablation runs (README): it reruns the stages whose
    params include the key, and `dvc exp show` lists the experiment's metrics."""
    folder = tmp_path / "exp"
    shutil.copytree(pipeline, folder, symlinks=True)
    reran = run(["dvc", "exp", "run", "-n", "probe025", "-S", "mrs.probe_ratio=0.25"], folder).stdout
    assert "Running stage 'mrs@" in reran and "Running stage 'prune_mrpf@" in reran
    assert "Running stage 'prune_uniform_l1@" not in reran and "Running stage 'train@" not in reran, reran
    shown = json.loads(run(["dvc", "exp", "show", "--json"], folder).stdout)
    text = json.dumps(shown)
    assert "probe025" in text and f"{RUN}/mrpf-0.5/eval.json" in text and "pgd_acc" in text
    params = yaml.safe_load((folder / "params.yaml").read_text())
    assert params["mrs"]["probe_ratio"] == 0.25     # the experiment's params are in the workspace


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> Path:
    """A grid with seeds, a tagged block (no fine-tuning), a block that remeasures MRS and an
    out folder, run by Snakemake and recorded by `dvc commit`."""
    from .test_workflow import SEEDED_GRID

    folder = make_project(tmp_path_factory.mktemp("seeded") / "proj", grid=SEEDED_GRID)
    run(["snakemake", "--cores", "2"], folder)
    run(["dvc", "commit", "-f"], folder)
    return folder


def test_a_seeded_grid_in_its_out_folder_is_recorded_by_dvc_and_reported_over_seeds(seeded):
    out = seeded / "experiments/seeded"
    assert "up to date" in run(["dvc", "status"], seeded).stdout
    assert "Running stage" not in run(["dvc", "repro", "--dry", "experiments/seeded/dvc.yaml"], seeded).stdout
    assert (out / "dvc.lock").is_file() and not (seeded / "dvc.lock").exists()
    summary = (out / "reports/summary.md").read_text()
    assert "### Over fine-tuning seeds" in summary
    line = next(x for x in summary.splitlines() if x.startswith("| mrpf ") and "| 0,1 " in x)
    assert "(2 seeds)" in line, line
    runs = out / "results/cifar10/vgg11_w8/pgd_at"
    ft0 = json.loads((runs / "uniform_l1-0.7-s0-ft0/prune.json").read_text())
    assert sum(step["finetune"]["epochs"] for step in ft0["steps"]) == 0
    assert set(json.loads((runs / "uniform_l1-0.7-s0-ft0/eval.json").read_text())) >= {"clean_acc", "pgd_acc"}
    assert "cw_acc" not in json.loads((runs / "uniform_l1-0.7-s0-ft0/eval.json").read_text())
    s0, s1 = (json.loads((runs / f"mrpf-0.5-s{s}/prune.json").read_text()) for s in (0, 1))
    assert s0["steps"][0]["mrs"] == s1["steps"][0]["mrs"]           # one dense MRS for every seed
    assert s0["steps"][0]["finetune"] != s1["steps"][0]["finetune"]  # fine-tuned with its own seed


def test_a_grid_starts_from_an_imported_model_instead_of_training(tmp_path):
    """A grid's ``imported`` arch: Snakemake imports the foreign state dict (a WideResNet in
    RobustBench's layout; prefixes stripped, the normalisation given), evaluates, prunes and
    reports it, trains nothing, and DVC records it."""
    import torch

    from .pipeline_project import IMPORTED_GRID, write_foreign_weights

    folder = make_project(tmp_path / "proj", grid=IMPORTED_GRID, git=False)
    weights = write_foreign_weights(folder / "models" / "wrn.pth")
    run(["snakemake", "--cores", "2"], folder)
    runs = folder / "results/cifar10/wrnimp/pgd_at"
    dense = torch.load(runs / "dense/checkpoint.pt", weights_only=True)
    foreign = torch.load(weights, weights_only=True)["state_dict"]
    assert all(torch.equal(dense["state_dict"][f"net.{k.removeprefix('module.')}"], v) for k, v in foreign.items())
    assert dense["state_dict"]["normalize.mean"].flatten().tolist() == pytest.approx([0.4, 0.5, 0.6])
    assert not (runs / "dense/train_metrics.json").exists()
    assert json.loads((runs / "dense/eval.json").read_text())["n_images"] == 100
    assert (runs / "uniform_l1-0.5/eval.json").is_file() and "wrnimp" in (folder / "reports/summary.md").read_text()
    run(["dvc", "commit", "-f"], folder)
    assert "up to date" in run(["dvc", "status"], folder).stdout


def test_a_damaged_cached_checkpoint_is_named_and_dvc_checkout_restores_it(pipeline, tmp_path):
    """One flipped byte in a DVC-tracked checkpoint of the tiny grid: `mrpf evaluate` refuses it
    in one line naming the file; `dvc checkout --force` (docs/reliability.md) restores it byte for byte."""
    from .test_bad_input import flip_a_byte

    folder = tmp_path / "clone"
    shutil.copytree(pipeline, folder, symlinks=True)
    path = f"{RUN}/dense/checkpoint.pt"
    before = digest(folder, [path])
    damaged = flip_a_byte(folder / path)
    (folder / path).unlink()          # a copy, not the cache's file (DVC may have linked it)
    (folder / path).write_bytes(damaged)
    failed = run(["mrpf", "evaluate", "--params", "params.yaml", "--run", "x", "--checkpoint", path], folder,
                 check=False)
    assert failed.returncode == 2
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and f"checkpoint {path}: damaged" in lines[0], failed.stderr
    assert "modified" in run(["dvc", "status"], folder).stdout
    run(["dvc", "checkout", "--force", path], folder)
    assert digest(folder, [path]) == before
    assert "up to date" in run(["dvc", "status"], folder).stdout
