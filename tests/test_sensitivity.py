import pytest
import torch

from mrpf import groups
from mrpf.data import read_npz
from mrpf.devices import setup
from mrpf.evaluation import load_model
from mrpf.objectives import Adversary
from mrpf.sensitivity import MrsSettings, compute_mrs

CPU = setup({"name": "cpu", "threads": None, "channels_last": False, "bf16": False})
ADV = Adversary(eps=8 / 255, step_size=2 / 255, steps=3)


@pytest.fixture
def setup_model(tiny_data, trained_checkpoint):
    model, _ = load_model(trained_checkpoint, CPU)
    _, found = groups.find_groups(model, 32, 10)
    return model, found, read_npz(tiny_data["train"]).subset(torch.arange(64))


def test_a_group_of_zero_weights_has_mrs_about_zero(setup_model):
    model, found, calibration = setup_model
    target = found[3]
    live = compute_mrs(model, [target], calibration, ADV, CPU, MrsSettings())
    change = abs(live["groups"][0]["probe_loss"] - live["base_loss"]) / live["base_loss"]
    assert change > 1e-4          # while the group has weights, masking it moves the robust loss
    with torch.no_grad():
        for name in target.members:
            module = dict(model.named_modules())[name]
            module.weight.zero_()
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
    out = compute_mrs(model, [target], calibration, ADV, CPU, MrsSettings())
    assert abs(out["groups"][0]["probe_loss"] - out["base_loss"]) / out["base_loss"] < 1e-6
    assert out["groups"][0]["mrs"] <= 1e-5


def test_mrs_is_identical_for_the_same_seed(setup_model):
    model, found, calibration = setup_model
    a = compute_mrs(model, found[:3], calibration, ADV, CPU, MrsSettings(seed=5))
    b = compute_mrs(model, found[:3], calibration, ADV, CPU, MrsSettings(seed=5))
    assert [r["mrs"] for r in a["groups"]] == [r["mrs"] for r in b["groups"]]


def test_fixed_and_adaptive_agree_when_the_probe_changes_nothing(setup_model):
    model, found, calibration = setup_model
    target = found[3]
    with torch.no_grad():   # all-zero group: masking it changes no output, so re-attacking cannot matter
        for name in target.members:
            module = dict(model.named_modules())[name]
            module.weight.zero_()
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
    adaptive = compute_mrs(model, [target], calibration, ADV, CPU, MrsSettings(attack="adaptive"))
    fixed = compute_mrs(model, [target], calibration, ADV, CPU, MrsSettings(attack="fixed"))
    assert adaptive["groups"][0]["probe_loss"] == pytest.approx(fixed["groups"][0]["probe_loss"], rel=1e-6)
