"""bench/gpu_evidence.sh, the one-GPU evidence run, smoke-tested on the CPU with tiny shards:
every step runs and the paired intervals come out (it measures nothing at this size)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from .conftest import TEST_THREADS, make_images, write_shard

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_evidence_script_runs_every_step_on_the_cpu(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    x, y = make_images(700, seed=3)
    write_shard(data / "cifar10-train-000000.tar.gz", x[:300], y[:300])
    write_shard(data / "cifar10-train-000001.tar.gz", x[300:600], y[300:600])
    write_shard(data / "cifar10-test-000000.tar.gz", x[600:], y[600:])
    env = dict(os.environ, GPU_EVIDENCE_SMOKE="1", GPU_EVIDENCE_DATA=str(data), GPU_EVIDENCE_WORK=str(tmp_path / "w"),
               OMP_NUM_THREADS=str(TEST_THREADS))
    done = subprocess.run(["bash", "bench/gpu_evidence.sh", "150"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "w/gpu-evidence-cpu-smoke.json").read_text())
    assert result["train_images"] == 600 and result["dense_epochs"] >= 1
    assert {"dense", "mrpf-0.9", "mrpf_joint-0.9", "uniform_l1-0.9", "hydra-0.9", "harp-0.9"} <= set(result["models"])
    differences = {"0.9 pgd", "0.9 autoattack", "mrpf_joint 0.9 pgd", "hydra 0.9 pgd", "harp 0.9 pgd"}
    assert differences <= set(result["differences"])
    assert result["autoattack_images"] == 10 and result["models"]["dense"]["autoattack_acc"] is not None
    for method in ("mrpf", "mrpf_joint", "hydra", "harp"):
        assert f"{method} - uniform_l1" in done.stdout, method
