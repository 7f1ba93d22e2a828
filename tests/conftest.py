"""Shared fixtures: generated tiny datasets (so the suite passes on a clone without
../shared) and the real CIFAR-10 subset from ../shared/data where present."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# Threads per test process: the machine's cores (at most 2) shared among pytest-xdist's
# workers (pyproject.toml runs one worker per core), so that workers do not oversubscribe.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
TEST_THREADS = max(1, min(2, (os.cpu_count() or 1) // WORKERS))
torch.set_num_threads(TEST_THREADS)
if WORKERS > 1:   # and in every subprocess a test starts (mrpf, snakemake, bench scripts) unless it says otherwise
    os.environ["OMP_NUM_THREADS"] = str(TEST_THREADS)
ROOT = Path(__file__).resolve().parents[1]


def mrpf_cli(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python -m mrpf ARGS`` in ``cwd`` with this checkout's package, TEST_THREADS threads."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(TEST_THREADS))
    return subprocess.run([sys.executable, "-m", "mrpf", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_TRAIN = SHARED_DATA / "cifar10-subset-train.npz"
REAL_TEST = SHARED_DATA / "cifar10-subset-test.npz"


def make_images(n: int, classes: int = 10, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Learnable synthetic images: each class is a coloured blob at its own place, plus noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    rng.shuffle(y)
    x = rng.normal(110, 30, size=(n, size, size, 3))
    colours = np.random.default_rng(1234).uniform(0, 255, size=(classes, 3))  # the same classes in every file
    for i, label in enumerate(y):
        cy, cx = (label * 7) % (size - 8) + 4, (label * 13) % (size - 8) + 4
        x[i, cy - 4:cy + 4, cx - 4:cx + 4] = colours[label]
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


def write_npz(path: Path, n: int, classes: int = 10, size: int = 32, seed: int = 0) -> Path:
    x, y = make_images(n, classes, size, seed)
    np.savez(path, x=x, y=y, classes=np.array([f"class{i}" for i in range(classes)]))
    return path


def write_shard(path: Path, images: np.ndarray, labels, members: dict[str, bytes] | None = None) -> Path:
    """A gzip'd WebDataset shard: KEY.png (lossless, so pixels compare exactly) + KEY.cls per
    image, then ``members`` (name -> bytes) as given, for malformed shards."""
    import io
    import tarfile

    from PIL import Image

    def add(tar, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w:gz") as tar:
        for i, (image, label) in enumerate(zip(images, labels)):
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            add(tar, f"s{i:06d}.png", buffer.getvalue())
            add(tar, f"s{i:06d}.cls", str(int(label)).encode())
        for name, data in (members or {}).items():
            add(tar, name, data)
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """Generated CIFAR-shaped train/test .npz files (600 / 200 images, 10 classes)."""
    root = tmp_path_factory.mktemp("tiny")
    return {"train": write_npz(root / "train.npz", 600, seed=1), "test": write_npz(root / "test.npz", 200, seed=2)}


def tiny_overrides(tiny_data: dict) -> list[str]:
    """Params overrides for fast runs on the generated data."""
    return [f"data.train_path={tiny_data['train']}", f"data.test_path={tiny_data['test']}",
            "data.val_size=100", "data.calibration_size=64", "train.epochs=2", "train.batch_size=64",
            "train.steps=2", "train.val_pgd_steps=2", "evaluate.n_images=100", "evaluate.autoattack_images=0",
            "evaluate.pgd_steps=3", "evaluate.latency_repeats=2", "evaluate.latency_batch=8",
            "device.name=cpu"]


@pytest.fixture(scope="session")
def real_data() -> dict:
    if not (REAL_TRAIN.is_file() and REAL_TEST.is_file()):
        pytest.skip(f"real CIFAR-10 subset not found at {SHARED_DATA} (only present beside the project checkout)")
    return {"train": REAL_TRAIN, "test": REAL_TEST}


@pytest.fixture(scope="session")
def trained_checkpoint(tiny_data, tmp_path_factory) -> Path:
    """A small VGG clean-trained on the generated data (it learns it well): a few seconds."""
    from mrpf.config import load_params
    from mrpf.training import train

    params = load_params(None, tiny_overrides(tiny_data) + ["train.method=clean", "train.epochs=15",
                                                            "data.augment=false", "train.val_pgd_steps=0"])
    run = tmp_path_factory.mktemp("trained")
    train(params, run, log=lambda m: None)
    return run / "checkpoint.pt"


OVERHEAD_MS = 100.0   # what the stand-in clock adds to a whole model's forward pass


@pytest.fixture
def fake_clock(monkeypatch):
    """A deterministic stand-in for the clock of mrpf/latency.py: a layer "takes" as many ms as
    its output has elements (linear in each width, so bilinear interpolation reproduces it
    exactly), a whole model the sum over its layer calls plus OVERHEAD_MS."""
    import torch

    from mrpf import latency, timing

    def layer_timer(forward, device, repeats, warmup=3, reduce=None):
        with torch.no_grad():
            return float(forward().numel())

    def model_timer(forward, device, repeats, warmup=3, reduce=None):
        total = [OVERHEAD_MS]

        def count(module, inputs, output):
            if not list(module.children()) and isinstance(output, torch.Tensor):
                total[0] += output.numel()

        handle = torch.nn.modules.module.register_module_forward_hook(count)
        try:
            with torch.no_grad():
                forward()
        finally:
            handle.remove()
        return total[0]

    monkeypatch.setattr(latency, "timed_ms", layer_timer)
    monkeypatch.setattr(timing, "timed_ms", model_timer)
