"""Kill anywhere: `mrpf train` and `mrpf prune` SIGKILLed mid-epoch, while a checkpoint is
written and while metrics are written (fault injection: MRPF_CRASH_AT, mrpf/io.py), then
run again. The rerun resumes and ends exactly where an uninterrupted run ends (CPU, fixed
seed), and no file under an output's final name is ever partial."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("seconds", "images_per_s", "latency")   # wall-clock fields: the only ones allowed to differ


def mrpf(args: list[str], cwd: Path, crash: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("MRPF_CRASH_AT", None)
    if crash:
        env["MRPF_CRASH_AT"] = crash
    return subprocess.run([sys.executable, "-m", "mrpf", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def without_timing(value):
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if not any(t in k for t in TIMING)}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def assert_complete_or_absent(folder: Path) -> None:
    """Every file under a final name is whole: JSON parses, checkpoints load, CSVs end in a newline."""
    from mrpf.io import load_checkpoint

    for path in folder.rglob("*"):
        if path.name.endswith(".tmp") or not path.is_file():
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".pt":
            load_checkpoint(path)
        elif path.suffix == ".csv":
            assert path.read_text().endswith("\n"), path


def history(run: Path) -> list[dict]:
    with open(run / "history.csv", newline="") as f:
        return [without_timing(row) for row in csv.DictReader(f)]


def same_weights(a: Path, b: Path) -> bool:
    from mrpf.io import load_checkpoint

    sa, sb = load_checkpoint(a)["state_dict"], load_checkpoint(b)["state_dict"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


TRAIN = ["train.epochs=2", "train.steps=1"]


@pytest.fixture(scope="module")
def uninterrupted_train(tiny_data, tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("train-ref")
    done = mrpf(["train", "--run", "r", *tiny_overrides(tiny_data), *TRAIN], cwd)
    assert done.returncode == 0, done.stderr
    return cwd / "runs" / "r"


@pytest.mark.slow
@pytest.mark.parametrize("crash", ["batch:3", "batch:12", "last.pt:1", "history.csv:1", "checkpoint.pt:1",
                                   "train_metrics.json:1"])
def test_killed_training_resumes_to_the_uninterrupted_result(tiny_data, tmp_path, uninterrupted_train, crash):
    args = ["train", "--run", "r", *tiny_overrides(tiny_data), *TRAIN]
    killed = mrpf(args, tmp_path, crash=crash)
    assert killed.returncode == -9, killed.stderr
    run = tmp_path / "runs" / "r"
    assert_complete_or_absent(run)
    assert not (run / "train_metrics.json").exists()
    done = mrpf(args, tmp_path)
    assert done.returncode == 0, done.stderr
    assert not list(run.glob(".*.tmp")), "stale temporaries left behind"
    ref = uninterrupted_train
    assert without_timing(json.loads((run / "train_metrics.json").read_text())) == \
        without_timing(json.loads((ref / "train_metrics.json").read_text()))
    assert same_weights(run / "checkpoint.pt", ref / "checkpoint.pt")
    assert history(run) == history(ref)


PRUNE = ["prune.steps=2", "prune.finetune_epochs=1", "prune.final_epochs=0", "mrs.steps=1", "mrs.batch_size=64",
         "--method", "mrpf", "--sparsity", "0.4"]


@pytest.fixture(scope="module")
def uninterrupted_prune(tiny_data, trained_checkpoint, tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("prune-ref")
    done = mrpf(["prune", "--run", "p", "--checkpoint", str(trained_checkpoint), *tiny_overrides(tiny_data), *PRUNE],
                cwd)
    assert done.returncode == 0, done.stderr
    return cwd / "runs" / "p"


@pytest.mark.slow
@pytest.mark.parametrize("crash, resumed", [
    ("batch:12", "resuming p after step 1/2"),        # mid-epoch in step 2's fine-tune
    ("step.json:1", "step 1/2: mrpf to"),               # step 1 done but not yet marked complete: redone
    ("checkpoint.pt:2", "resuming p after step 1/2"),   # while step 2's checkpoint is written
    ("prune.json:1", "resuming p after step 2/2"),      # while the metrics are written
])
def test_killed_pruning_resumes_to_the_uninterrupted_result(tiny_data, trained_checkpoint, tmp_path,
                                                            uninterrupted_prune, crash, resumed):
    args = ["prune", "--run", "p", "--checkpoint", str(trained_checkpoint), *tiny_overrides(tiny_data), *PRUNE]
    killed = mrpf(args, tmp_path, crash=crash)
    assert killed.returncode == -9, killed.stderr
    run = tmp_path / "runs" / "p"
    assert_complete_or_absent(run)
    assert not (run / "prune.json").exists()
    done = mrpf(args, tmp_path)
    assert done.returncode == 0, done.stderr
    assert resumed in done.stderr
    ref = uninterrupted_prune
    assert without_timing(json.loads((run / "prune.json").read_text())) == \
        without_timing(json.loads((ref / "prune.json").read_text()))
    assert same_weights(run / "checkpoint.pt", ref / "checkpoint.pt")


@pytest.mark.slow
def test_pruning_with_ema_prunes_saves_and_resumes_the_validated_model(tiny_data, trained_checkpoint, tmp_path):
    """With train.ema_decay the fine-tune validates and saves the EMA; pruning must go on from
    that model, save it, and a resumed run must end where an uninterrupted one ends."""
    args = ["prune", "--run", "p", "--checkpoint", str(trained_checkpoint), *tiny_overrides(tiny_data), *PRUNE,
            "train.ema_decay=0.5"]
    ref = tmp_path / "ref"
    ref.mkdir()
    done = mrpf(args, ref)
    assert done.returncode == 0, done.stderr
    ref_run = ref / "runs" / "p"
    assert same_weights(ref_run / "checkpoint.pt", ref_run / "step2" / "checkpoint.pt"), \
        "the saved pruned model is not the fine-tune's validated (EMA) model"
    killed = mrpf(args, tmp_path, crash="batch:12")          # mid-epoch in step 2's fine-tune
    assert killed.returncode == -9, killed.stderr
    done = mrpf(args, tmp_path)
    assert done.returncode == 0 and "resuming p after step 1/2" in done.stderr, done.stderr
    run = tmp_path / "runs" / "p"
    assert without_timing(json.loads((run / "prune.json").read_text())) == \
        without_timing(json.loads((ref_run / "prune.json").read_text()))
    assert same_weights(run / "checkpoint.pt", ref_run / "checkpoint.pt")
