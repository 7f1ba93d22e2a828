"""A copy of the pipeline (Snakefile, workflow/, params.yaml with a `tiny` grid on
generated data) in a temporary folder, for the Snakemake / DVC / SLURM tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from .conftest import write_npz

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY_GRID = {
    "datasets": ["cifar10"], "archs": ["vgg11_w8"], "train_methods": ["pgd_at"],
    "prune_methods": ["mrpf", "uniform_l1"], "sparsities": [0.5], "gpus_per_job": 0,
    "runtime_min": {"data": 5, "train": 5, "evaluate": 5, "mrs": 5, "prune": 5, "report": 5}, "mem_mb": 1000,
    "threads": {"train": 1, "evaluate": 1, "mrs": 1, "prune": 1},
    "params": {
        "data": {"val_size": 100, "calibration_size": 64},
        "train": {"epochs": 1, "batch_size": 64, "steps": 1, "val_pgd_steps": 1},
        "evaluate": {"n_images": 100, "pgd_steps": 2, "step_size": None, "attacks": ["clean", "fgsm", "pgd", "cw"],
                     "autoattack_images": 0, "latency_repeats": 2, "latency_batch": 8},
        "mrs": {"steps": 1, "batch_size": 64},
        # the paper's rule: joint_search's candidate scoring is tested in tests/test_selection.py
        "prune": {"steps": 1, "finetune_epochs": 1, "final_epochs": 0, "allocation": "inverse_mrs"},
        "device": {"name": "cpu", "threads": 1},
    },
}


IMPORTED_GRID = dict(TINY_GRID, archs=["wrnimp"], prune_methods=["uniform_l1"], imported={
    "wrnimp": {"arch": "wrn10_1", "weights": "models/wrn.pth", "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}})


def write_foreign_weights(path: Path) -> Path:
    """A WideResNet-10-1 state dict in RobustBench's layout, saved as DataParallel names it."""
    import torch

    from .robustbench_layout import robustbench_wrn

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in robustbench_wrn(10, 1).items()}}, path)
    return path


def env() -> dict:
    """The environment for engine subprocesses: this venv's tools first, one thread each."""
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    e["PATH"] = f"{BIN}:{e.get('PATH', '')}"
    return e


def run(cmd: list[str] | str, cwd: Path, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout,
                            shell=isinstance(cmd, str))
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def make_project(folder: Path, grid: dict | None = None, git: bool = True) -> Path:
    """Pipeline files + params.yaml (grid `tiny`) + generated data + dvc.yaml, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "Snakefile", folder)
    shutil.copytree(ROOT / "workflow", folder / "workflow", dirs_exist_ok=True)
    offline = folder / "offline"
    offline.mkdir(exist_ok=True)
    write_npz(offline / "cifar10-train.npz", 600, seed=1)
    write_npz(offline / "cifar10-test.npz", 200, seed=2)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["grid"] = "tiny"
    params["grids"]["tiny"] = grid or TINY_GRID
    params["data"]["offline_dir"] = "offline"
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if git:
        run("git init -q && git config user.email t@t && git config user.name t", folder)
        run(["dvc", "init", "-q"], folder)
        (folder / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    else:
        run(["dvc", "init", "-q", "--no-scm"], folder)
    run(["mrpf", "dvcyaml"], folder)
    return folder
