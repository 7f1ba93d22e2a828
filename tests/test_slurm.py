"""The SLURM profile against a real single-node SLURM (tests/slurm/start-single-node.sh,
which .ci/run calls): the tiny grid runs to the end through sbatch, and a failing job
makes snakemake fail with the job's SLURM state.

Skipped with a reason where no SLURM is up, except under MRPF_REQUIRE_SLURM=1 (CI),
where a missing SLURM is a failure."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess

import pytest

from .pipeline_project import TINY_GRID, env, make_project, run

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


def slurm_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return out.returncode == 0 and any(state in out.stdout for state in ("idle", "mix", "alloc"))


@pytest.fixture(scope="module", autouse=True)
def need_slurm():
    if not slurm_up():
        if os.environ.get("MRPF_REQUIRE_SLURM") == "1":
            pytest.fail("MRPF_REQUIRE_SLURM=1 but no SLURM node answers sinfo (run tests/slurm/start-single-node.sh)")
        pytest.skip("no SLURM here: run tests/slurm/start-single-node.sh (root, Debian) to test the SLURM profile")


# status checks every second (the profile waits 5 s, then 10 s more per check without news)
SLURM = ["snakemake", "--profile", "workflow/profiles/slurm", "--jobs", "4",
         "--slurm-init-seconds-before-status-checks", "1"]


def release_now(job: str) -> None:
    """SLURM holds a requeued job for about two minutes (state PENDING, reason BeginTime); what
    the test checks starts after that hold, so it lifts it as an administrator would."""
    import time

    deadline = time.time() + 60
    while time.time() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True).stdout
        if "RUNNING" in state:
            return
        if "PENDING" in state and "BeginTime" in state:
            subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)
            return
        time.sleep(0.2)
    raise AssertionError(f"the requeued job {job} never went back to the queue")


def test_tiny_grid_runs_to_the_end_through_sbatch(tmp_path):
    grid = copy.deepcopy(TINY_GRID)
    grid["gpus_per_job"] = 1          # the node has two (fake) GPUs: jobs ask sbatch --gpus=1
    folder = make_project(tmp_path / "proj", grid=grid, git=False)
    result = run(SLURM, folder, timeout=1200)
    assert (folder / "reports/summary.md").is_file()
    log = result.stdout + result.stderr
    assert "sbatch" in log or "SLURM" in log
    slurm_logs = list((folder / "logs/slurm").rglob("*.log"))
    assert len(slurm_logs) >= 9, slurm_logs        # every job went through SLURM


def test_a_failing_job_fails_snakemake_with_its_slurm_state(tmp_path):
    grid = copy.deepcopy(TINY_GRID)
    grid["datasets"] = ["svhn"]        # no offline copy, and downloads are off: `mrpf data` fails
    grid["params"]["data"] = dict(grid["params"]["data"], download=False)
    folder = make_project(tmp_path / "proj", grid=grid, git=False)
    result = run(SLURM, folder, check=False, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert "SLURM status is: 'FAILED'" in log, log[-3000:]
    assert "dataset 'svhn' not found" in (folder / "logs/data/svhn.log").read_text()


def test_a_requeued_training_job_resumes_and_the_grid_ends_as_an_uninterrupted_run(tmp_path):
    """`scontrol requeue` of the running dense training (what pre-emption does): SLURM stops the
    job and runs it again; the rerun resumes from the last resume point and the training's
    metrics and weights equal those of an uninterrupted local run."""
    import json
    import time

    from .test_kill import same_weights, without_timing

    grid = copy.deepcopy(TINY_GRID)
    grid["params"]["train"] = dict(grid["params"]["train"], epochs=4)
    target = "results/cifar10/vgg11_w8/pgd_at/dense/train_metrics.json"
    reference = make_project(tmp_path / "ref", grid=grid, git=False)
    run(["snakemake", "--cores", "1", target], reference)
    folder = make_project(tmp_path / "proj", grid=grid, git=False)
    snakemake = subprocess.Popen(SLURM + [target], cwd=folder, env=env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    dense = folder / "results/cifar10/vgg11_w8/pgd_at/dense"
    deadline = time.time() + 600
    while not (dense / "last.pt").is_file():          # the training job is past its first epoch
        assert snakemake.poll() is None and time.time() < deadline, "training never reached its first epoch"
        time.sleep(0.2)
    jobs = subprocess.run(["squeue", "-h", "-o", "%i %k"], capture_output=True, text=True).stdout.splitlines()
    train_job = next(line.split()[0] for line in jobs if "rule_train" in line)
    subprocess.run(["scontrol", "requeue", train_job], check=True)
    release_now(train_job)
    out, _ = snakemake.communicate(timeout=900)
    assert snakemake.returncode == 0, out[-3000:]
    log = (folder / "logs/train/cifar10/vgg11_w8/pgd_at.log").read_text()
    assert "resuming dense" in log, log[-2000:]
    for name in ("train_metrics.json",):
        assert without_timing(json.loads((dense / name).read_text())) == without_timing(json.loads(
            (reference / "results/cifar10/vgg11_w8/pgd_at/dense" / name).read_text())), name
    assert same_weights(dense / "checkpoint.pt", reference / "results/cifar10/vgg11_w8/pgd_at/dense/checkpoint.pt")
