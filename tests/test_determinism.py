"""Same seed, same params: identical metrics on CPU, bit for bit, for train, mrs and prune.
Wall-clock fields (``*seconds*``, ``images_per_s``, ``latency*``) are the only exceptions."""

from __future__ import annotations

import json

import pytest

from mrpf.config import load_params
from mrpf.pruning import run_prune
from mrpf.sensitivity import run_mrs
from mrpf.training import train

from .conftest import tiny_overrides
from .test_kill import without_timing

quiet = lambda *a: None  # noqa: E731


def twice(fn, tmp_path, name):
    return [json.loads(json.dumps(fn(tmp_path / f"{name}{i}"))) for i in range(2)]


def test_training_is_bitwise_repeatable(tiny_data, tmp_path):
    params = load_params(None, tiny_overrides(tiny_data) + ["train.epochs=1"])
    a, b = twice(lambda d: (train(params, d, log=quiet), json.loads((d / "train_metrics.json").read_text()))[1],
                 tmp_path, "t")
    assert without_timing(a) == without_timing(b) and a["train_loss"] == b["train_loss"]


def test_mrs_is_bitwise_repeatable(tiny_data, trained_checkpoint, tmp_path):
    params = load_params(None, tiny_overrides(tiny_data) + ["mrs.steps=2"])
    a, b = twice(lambda d: run_mrs(params, trained_checkpoint, d, log=quiet), tmp_path, "m")
    assert without_timing(a) == without_timing(b)
    assert any(g["mrs"] > 1e-4 for g in a["groups"])     # not every value is the floor (1e-6)


@pytest.mark.slow
def test_pruning_is_bitwise_repeatable(tiny_data, trained_checkpoint, tmp_path):
    params = load_params(None, tiny_overrides(tiny_data) + ["prune.steps=2", "prune.finetune_epochs=1",
                                                            "prune.final_epochs=0", "mrs.steps=1",
                                                            "prune.sparsity=0.4"])
    a, b = twice(lambda d: run_prune(params, trained_checkpoint, d, log=quiet), tmp_path, "p")
    assert without_timing(a) == without_timing(b)
