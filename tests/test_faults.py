"""Faults beyond a killed process (docs/reliability.md, "Faults"). A full disk in the middle of a
run: one line naming the file, the previous complete file intact, no temporary left, and the same
command resumes once space is freed (an injected ENOSPC always; a real small tmpfs where mounting
is allowed). SIGTERM, what a scheduler sends before SIGKILL (mrpf/stopping.py): fault injection
MRPF_SIGTERM_AT (mrpf/io.py: crash_point) sends it at a batch; the run stops at the next batch
boundary with STOPPED_STATUS and one line, and the rerun ends exactly where an uninterrupted run
ends."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import uuid

import pytest
import torch

from mrpf.config import load_params
from mrpf.errors import MrpfError
from mrpf.io import load_checkpoint, write_json
from mrpf.stopping import STOPPED_STATUS
from mrpf.training import train

from .conftest import mrpf_cli, tiny_overrides
from .test_kill import PRUNE, same_weights, uninterrupted_prune, uninterrupted_train, without_timing  # noqa: F401
from .test_kill import TRAIN as KILL_TRAIN
from .test_kill import mrpf as one_thread_mrpf  # the uninterrupted runs' thread count: bit-identical results

TRAIN = ["train.epochs=3", "model.arch=vgg11_w8", "train.val_pgd_steps=0"]


def _temporaries(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(folder.rglob(".*.tmp"))


def test_a_full_disk_writing_a_json_keeps_the_old_file_and_names_the_path(tmp_path, monkeypatch):
    path = tmp_path / "eval.json"
    write_json(path, {"old": 1})

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    with pytest.raises(MrpfError, match=re.escape(f"no space left on the device writing {path}") + "$"):
        write_json(path, {"new": 2})
    monkeypatch.undo()
    assert path.read_text().strip().replace(" ", "").replace("\n", "") == '{"old":1}'
    assert _temporaries(tmp_path) == []


def test_a_full_disk_in_training_keeps_the_last_epoch_and_the_rerun_resumes_bit_identically(tiny_data, tmp_path,
                                                                                             monkeypatch):
    params = load_params(None, tiny_overrides(tiny_data) + TRAIN)
    train(params, tmp_path / "whole", log=lambda m: None)
    writes = {"last.pt": 0}
    real = pathlib.Path.write_bytes

    def filling(self, data):
        if self.name.startswith(".last.pt."):
            writes["last.pt"] += 1
            if writes["last.pt"] == 2:      # the disk fills while epoch 2's resume point is written
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", filling)
    run = tmp_path / "cut"
    with pytest.raises(MrpfError, match=re.escape(f"no space left on the device writing {run / 'last.pt'}")):
        train(params, run, log=lambda m: None)
    monkeypatch.undo()
    assert _temporaries(run) == []
    assert load_checkpoint(run / "last.pt")["epoch"] == 0          # epoch 1's resume point, intact
    assert not (run / "checkpoint.pt").exists()
    lines = []
    train(params, run, log=lines.append)
    assert "resuming cut after epoch 1/3" in lines
    whole, resumed = (load_checkpoint(r / "checkpoint.pt")["state_dict"] for r in (tmp_path / "whole", run))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.fixture
def small_filesystem(tmp_path):
    """A 4 MiB tmpfs (root only: CI runs as root); skipped with the reason elsewhere."""
    mount = tmp_path / f"small-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the injected-ENOSPC tests above cover the behaviour")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the injected-ENOSPC tests cover the behaviour")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.slow
def test_a_real_full_disk_in_mrpf_train_is_one_line_and_freeing_space_resumes(tiny_data, tmp_path, small_filesystem):
    overrides = tiny_overrides(tiny_data) + TRAIN
    probe = mrpf_cli("train", "--run", "probe", *overrides, "train.epochs=1", cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    size = (tmp_path / "runs/probe/checkpoint.pt").stat().st_size   # last.pt holds more: weights + momentum
    free = shutil.disk_usage(small_filesystem).free
    ballast = small_filesystem / "ballast"
    ballast.write_bytes(b"\0" * max(0, free - int(3.2 * size)))    # room for one resume point, not for two
    failed = mrpf_cli("train", "--run", "r", *overrides, cwd=small_filesystem)
    assert failed.returncode == 2, failed.stderr
    lines = failed.stderr.strip().splitlines()      # the epoch lines, then the one error line
    assert lines[-1] == "mrpf: error: no space left on the device writing runs/r/last.pt", lines
    assert sum(line.startswith("mrpf: error:") for line in lines) == 1 and "Traceback" not in failed.stderr
    run = small_filesystem / "runs" / "r"
    assert _temporaries(run) == []
    assert load_checkpoint(run / "last.pt")["epoch"] == 0
    ballast.unlink()                                                  # space freed: the same command
    resumed = mrpf_cli("train", "--run", "r", *overrides, cwd=small_filesystem)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming r after epoch 1/3" in resumed.stdout + resumed.stderr
    assert (run / "checkpoint.pt").is_file() and not (run / "last.pt").exists()



def _terminated(args: list[str], cwd: pathlib.Path, at: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1",
               MRPF_SIGTERM_AT=at)
    env.pop("MRPF_CRASH_AT", None)
    return subprocess.run([sys.executable, "-m", "mrpf", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def _one_stop_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == STOPPED_STATUS, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if line.startswith("mrpf: ")]
    assert len(lines) == 1 and lines[0].startswith("mrpf: stopped by SIGTERM"), done.stderr
    return lines[0]


@pytest.mark.slow
def test_sigterm_in_training_stops_at_the_batch_and_the_rerun_resumes_there_bit_identically(
        tiny_data, tmp_path, uninterrupted_train):  # noqa: F811 (the fixture of tests/test_kill.py)
    args = ["train", "--run", "r", *tiny_overrides(tiny_data), *KILL_TRAIN]
    line = _one_stop_line(_terminated(args, tmp_path, "batch:5"))
    assert "in epoch 1/2 after batch 5; the same command resumes there" in line
    run = tmp_path / "runs" / "r"
    assert load_checkpoint(run / "last.pt")["in_progress"]["batch"] == 5
    assert not (run / "checkpoint.pt").exists() and _temporaries(run) == []
    done = one_thread_mrpf(args, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "resuming r in epoch 1/2 after batch 5" in done.stdout + done.stderr
    assert same_weights(run / "checkpoint.pt", uninterrupted_train / "checkpoint.pt")
    assert without_timing(json.loads((run / "train_metrics.json").read_text())) == \
        without_timing(json.loads((uninterrupted_train / "train_metrics.json").read_text()))


@pytest.mark.slow
def test_sigterm_in_pruning_stops_in_the_fine_tune_and_the_rerun_ends_as_the_uninterrupted_run(
        tiny_data, trained_checkpoint, tmp_path, uninterrupted_prune):  # noqa: F811 (tests/test_kill.py's fixture)
    args = ["prune", "--run", "p", "--checkpoint", str(trained_checkpoint), *tiny_overrides(tiny_data), *PRUNE]
    line = _one_stop_line(_terminated(args, tmp_path, "batch:12"))    # in step 2's fine-tune
    assert "the same command resumes there" in line
    run = tmp_path / "runs" / "p"
    assert not (run / "prune.json").exists() and _temporaries(run) == []
    done = one_thread_mrpf(args, tmp_path)
    assert done.returncode == 0, done.stderr
    assert without_timing(json.loads((run / "prune.json").read_text())) == \
        without_timing(json.loads((uninterrupted_prune / "prune.json").read_text()))
    assert same_weights(run / "checkpoint.pt", uninterrupted_prune / "checkpoint.pt")


@pytest.mark.slow
def test_sigterm_in_evaluation_stops_at_once_and_writes_nothing(tiny_data, trained_checkpoint, tmp_path):
    args = ["evaluate", "--run", "e", "--checkpoint", str(trained_checkpoint), *tiny_overrides(tiny_data)]
    line = _one_stop_line(_terminated(args, tmp_path, "batch:2"))
    assert "nothing half-written was kept" in line
    assert not (tmp_path / "runs" / "e" / "eval.json").exists()
    assert _temporaries(tmp_path) == []
