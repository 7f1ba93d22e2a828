"""`mrpf import`: a torchvision ResNet-18 state dict saved by plain torchvision code becomes an
mrpf checkpoint that MRS, prune and evaluate accept; mismatches are one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

from .conftest import mrpf_cli as mrpf
from .conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["evaluate.n_images=50", "evaluate.attacks=[clean,pgd]", "evaluate.pgd_steps=2", "evaluate.step_size=null",
         "evaluate.latency_repeats=1", "evaluate.latency_batch=4", "mrs.steps=1", "mrs.batch_size=64",
         "data.calibration_size=64", "prune.steps=1", "prune.finetune_epochs=0", "prune.final_epochs=0",
         "device.name=cpu"]




@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """What a user has: torchvision's ResNet-18 for 10 classes, trained elsewhere under
    DataParallel (every key prefixed with module.), saved with torch.save."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}, "epoch": 90}, path)
    return path


@pytest.mark.slow
def test_an_imported_torchvision_resnet18_goes_through_mrs_prune_and_evaluate(tiny_data, weights, tmp_path):
    common = tiny_overrides(tiny_data) + SMALL
    done = mrpf("import", "--arch", "tv:resnet18", "--weights", str(weights), "--run", "imported", *common,
                cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "normalisation from the cifar10 default" in done.stderr + done.stdout
    checkpoint = tmp_path / "runs/imported/checkpoint.pt"
    state = torch.load(checkpoint, weights_only=True)
    source = torch.load(weights, weights_only=True)["state_dict"]
    assert torch.equal(state["state_dict"]["net.fc.weight"], source["module.fc.weight"])
    assert json.loads((tmp_path / "runs/imported/eval.json").read_text())["n_images"] == 50
    for args in (["mrs", "--run", "mrs", "--checkpoint", str(checkpoint)],
                 ["prune", "--run", "pruned", "--checkpoint", str(checkpoint), "--method", "mrpf", "--sparsity", "0.5"],
                 ["evaluate", "--run", "pruned"]):
        done = mrpf(*args, *common, cwd=tmp_path)
        assert done.returncode == 0, (args, done.stderr[-2000:])
    prune = json.loads((tmp_path / "runs/pruned/prune.json").read_text())
    assert abs(prune["achieved"] - 0.5) <= 0.01


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("module.fc.bias"), "missing keys fc.bias (1)"),
    (lambda d: d.update({"module.extra.weight": torch.zeros(1)}), "unexpected keys extra.weight (1)"),
    (lambda d: d.update({"module.fc.weight": torch.zeros(1000, 512), "module.fc.bias": torch.zeros(1000)}),
     "fc.weight has 1000 classes, dataset 'cifar10' has 10"),
])
def test_weights_that_do_not_fit_are_one_error_naming_the_keys(tiny_data, weights, tmp_path, edit, message):
    state = torch.load(weights, weights_only=True)["state_dict"]
    edit(state)
    torch.save(state, tmp_path / "bad.pth")
    done = mrpf("import", "--arch", "tv:resnet18", "--weights", "bad.pth", "--run", "x",
                *tiny_overrides(tiny_data), *SMALL, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs/x").exists()
