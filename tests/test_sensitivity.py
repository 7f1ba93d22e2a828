import copy

import pytest
import torch
import torch.nn.functional as F

from mrpf import groups
from mrpf.attacks import pgd
from mrpf.config import DeviceParams
from mrpf.data import ImageSet, read_npz
from mrpf.devices import setup
from mrpf.errors import MrpfError
from mrpf.groups import masked
from mrpf.models import Classifier, load_model
from mrpf.objectives import Adversary
from mrpf.sensitivity import MrsSettings, compute_mrs, probe_channels

CPU = setup(DeviceParams(name="cpu", channels_last=False, bf16=False))
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
    assert out["groups"][0]["mrs"] == pytest.approx(mrs_of(out, out["groups"][0]), abs=1e-12)
    assert out["groups"][0]["mrs"] <= 1e-5


def mrs_of(result: dict, row: dict, floor: float = 1e-6) -> float:
    """MRS = max(floor, (R(probe) - R) / R) from the losses the result reports."""
    return max(floor, (row["probe_loss"] - result["base_loss"]) / result["base_loss"])


def tiny_classifier() -> torch.nn.Module:
    """Two convs and a linear head on 8x8 inputs: small enough to compute MRS by hand."""
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 10))
    return Classifier(net, (0.5,) * 3, (0.25,) * 3).eval()


def tiny_calibration(n: int = 40) -> ImageSet:
    gen = torch.Generator().manual_seed(4)
    return ImageSet(torch.randint(0, 256, (n, 3, 8, 8), generator=gen, dtype=torch.uint8),
                    torch.randint(0, 10, (n,), generator=gen), [str(i) for i in range(10)])


def test_mrs_equals_the_relative_loss_rise_computed_by_hand():
    """Clean signal: MRS_g = (CE with the floor(rho * c) lowest-L1 channels of g zeroed - CE) / CE."""
    model, calibration = tiny_classifier(), tiny_calibration()
    _, found = groups.find_groups(model, 8, 10)
    out = compute_mrs(model, found, calibration, ADV, CPU, MrsSettings(signal="clean", probe_ratio=0.5),
                      batch_size=16)
    x, y = calibration.x.float() / 255, calibration.y
    with torch.no_grad():
        base = F.cross_entropy(model(x), y).item()
        assert out["base_loss"] == pytest.approx(base, rel=1e-6)
        for group, row in zip(found, out["groups"]):
            conv = dict(model.named_modules())[group.root]
            lowest = torch.argsort(conv.weight.abs().sum((1, 2, 3)))[: group.channels // 2]
            probed = copy.deepcopy(model)
            probed_conv = dict(probed.named_modules())[group.root]
            probed_conv.weight[lowest] = 0
            probed_conv.bias[lowest] = 0
            loss = F.cross_entropy(probed(x), y).item()
            assert row["probe_channels"] == len(lowest)
            assert row["probe_loss"] == pytest.approx(loss, rel=1e-6)
            assert row["mrs"] == pytest.approx(max(1e-6, (loss - base) / base), abs=2e-6)   # fp32 losses
    assert any(row["mrs"] > 1e-4 for row in out["groups"])    # not every value is the floor


def test_the_probe_masks_exactly_the_lowest_magnitude_channels():
    model = tiny_classifier()
    _, found = groups.find_groups(model, 8, 10)
    for group in found:
        conv = dict(model.named_modules())[group.root]
        l1 = conv.weight.abs().sum((1, 2, 3))
        for ratio in (0.25, 0.5, 0.75):
            chosen = probe_channels(model, group, ratio)
            n = max(1, min(group.channels - 1, int(ratio * group.channels)))
            assert len(chosen) == n
            assert set(chosen.tolist()) == set(torch.topk(l1, n, largest=False).indices.tolist())
            with masked(model, group, chosen), torch.no_grad():
                zeroed = (conv.weight.flatten(1).abs().sum(1) == 0).nonzero().flatten()
                assert set(zeroed.tolist()) == set(chosen.tolist())


def test_fixed_reuses_the_dense_models_perturbations_and_adaptive_reattacks(setup_model):
    model, found, calibration = setup_model
    target = found[1]
    settings = MrsSettings(attack="fixed", seed=2)
    fixed = compute_mrs(model, [target], calibration, ADV, CPU, settings, batch_size=32)
    adaptive = compute_mrs(model, [target], calibration, ADV, CPU, MrsSettings(attack="adaptive", seed=2),
                           batch_size=32)
    # the dense model's adversarial examples, drawn as compute_mrs draws them (seed + batch index)
    x, y = calibration.x.float() / 255, calibration.y
    examples = []
    for i in range(2):
        torch.manual_seed(2 + i)
        xb, yb = x[32 * i: 32 * (i + 1)], y[32 * i: 32 * (i + 1)]
        examples.append((pgd(model, xb, yb, eps=ADV.eps, step_size=ADV.step_size, steps=ADV.steps), yb))
    with masked(model, target, probe_channels(model, target, 0.5)), torch.no_grad():
        reused = sum(F.cross_entropy(model(xa), yb, reduction="sum").item() for xa, yb in examples) / len(y)
    assert fixed["base_loss"] == pytest.approx(adaptive["base_loss"], rel=1e-9)
    assert fixed["groups"][0]["probe_loss"] == pytest.approx(reused, rel=1e-5)
    assert adaptive["groups"][0]["probe_loss"] > reused + 1e-3     # re-attacking the probed model finds more


def test_mrs_leaves_the_global_random_state_as_it_was(setup_model):
    model, found, calibration = setup_model
    torch.manual_seed(11)
    expected = torch.rand(5)
    torch.manual_seed(11)
    compute_mrs(model, found[:2], calibration, ADV, CPU, MrsSettings(seed=5))
    assert torch.equal(torch.rand(5), expected)


def test_mrs_without_calibration_images_is_a_clear_error(setup_model):
    model, found, calibration = setup_model
    with pytest.raises(MrpfError, match="data.calibration_size must be positive"):
        compute_mrs(model, found[:1], calibration.subset(torch.arange(0)), ADV, CPU, MrsSettings())


def test_mrs_is_identical_for_the_same_seed(setup_model):
    model, found, calibration = setup_model
    a = compute_mrs(model, found[:3], calibration, ADV, CPU, MrsSettings(seed=5))
    b = compute_mrs(model, found[:3], calibration, ADV, CPU, MrsSettings(seed=5))
    assert [r["mrs"] for r in a["groups"]] == [r["mrs"] for r in b["groups"]]
    assert [r["mrs"] for r in a["groups"]] == pytest.approx([mrs_of(a, r) for r in a["groups"]], rel=1e-12)


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
