"""HYDRA and HARP (mrpf/learned.py): what the learned scores and rates find, and what they never touch."""

import copy
import types

import pytest
import torch
import torch.nn as nn

from mrpf import groups as groups_mod
from mrpf import learned
from mrpf.config import load_params
from mrpf.data import ImageSet
from mrpf.devices import setup
from mrpf.latency import budget_counts
from mrpf.pruning import learned_solver

SIZE = 32


def _params(method: str, *extra: str):
    return load_params(None, [f"prune.method={method}", "prune.finetune_method=pgd_at", "attack.eps=2/255",
                              "train.steps=2", "train.batch_size=64", "data.augment=false", "device.name=cpu",
                              "prune.round_to=1", "prune.r_max=0.9", *extra])


def _solve(model, params, images: ImageSet, budget: float, tmp_path, classes: int):
    """learned_solver on ``model`` as ``prune_step`` calls it at step 1."""
    runtime = setup(params.device, lambda m: None)
    _, found = groups_mod.find_groups(model, SIZE, classes)
    arch = {"input_size": SIZE, "num_classes": classes}
    splits = types.SimpleNamespace(train=images, calibration=images, spec=None)
    dense = budget_counts(model, SIZE, None)
    record: dict = {}
    solve_for, scores = learned_solver(model, found, arch, params, splits, runtime, budget, dense,
                                       [g.channels for g in found], record, lambda m: None, step=1, run_dir=tmp_path)
    return found, solve_for, scores, record, dense


def _signal_model() -> nn.Module:
    """conv(3 -> 4) -> BN -> ReLU -> mean -> linear(4 -> 2). Channel 0 reads the red plane with
    small weights and alone drives the classifier; channels 1-3 have large random weights the
    classifier ignores, so magnitude ranks channel 0 last."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    head = nn.Linear(4, 2)
    with torch.no_grad():
        conv.weight.normal_()
        conv.weight[0] = 0
        conv.weight[0, 0, 1, 1] = 0.05
        head.weight.zero_()
        head.weight[:, 0] = torch.tensor([-400.0, 400.0])
        head.bias.copy_(torch.tensor([10.0, -10.0]))     # the boundary at red = 0.5
    return nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).eval()


def _red_images(n: int = 320) -> ImageSet:
    gen = torch.Generator().manual_seed(1)
    y = torch.randint(0, 2, (n,), generator=gen)
    x = torch.randint(0, 256, (n, 3, SIZE, SIZE), generator=gen, dtype=torch.uint8)
    red = torch.where(y == 1, torch.randint(180, 256, (n,), generator=gen), torch.randint(0, 76, (n,), generator=gen))
    x[:, 0] = red[:, None, None].to(torch.uint8)
    return ImageSet(x, y, ["dark", "red"])


def test_hydra_keeps_the_channel_that_carries_the_class_under_attack(tmp_path):
    model = _signal_model()
    _, found = groups_mod.find_groups(model, SIZE, 2)
    assert int(torch.argmin(groups_mod.channel_magnitude(model, found[0]))) == 0   # magnitude drops it first
    params = _params("hydra", "prune.score_epochs=3", "prune.score_lr=1")
    found, solve_for, scores, record, _ = _solve(model, params, _red_images(), 0.5, tmp_path, 2)
    assert record["learned"]["initial_keep"] == [1]     # one channel of four kept
    assert int(torch.argmax(scores[0])) == 0, scores[0]
    assert record["learned"]["history"][-1]["loss"] < record["learned"]["history"][0]["loss"]


def test_score_learning_changes_no_weight(tmp_path):
    model = _signal_model()
    before = copy.deepcopy(model.state_dict())
    flags = [p.requires_grad for p in model.parameters()]
    _solve(model, _params("harp", "prune.score_epochs=1"), _red_images(128), 0.5, tmp_path, 2)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)       # weights and BN statistics, bit for bit
    assert [p.requires_grad for p in model.parameters()] == flags


def _duplicate_model(images: ImageSet) -> nn.Module:
    classes = len(images.classes)
    """Three conv groups (16 channels each) trained on ``images`` through a one-channel middle
    layer, whose filter is then copied 16 times, the next layer reading the first copy only:
    the other 15 are exact duplicates, and losing them costs nothing."""
    torch.manual_seed(3)
    narrow = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 1, 3, padding=1), nn.ReLU(),
                           nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                           nn.Linear(16, classes))
    optimizer = torch.optim.Adam(narrow.parameters(), lr=0.01)
    x, y = images.x.float() / 255, images.y
    for i in range(150):
        batch = slice((i % 5) * 64, (i % 5 + 1) * 64)
        optimizer.zero_grad()
        nn.functional.cross_entropy(narrow(x[batch]), y[batch]).backward()
        optimizer.step()
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, classes))
    with torch.no_grad():
        for i in (0, 8):
            model[i].load_state_dict(narrow[i].state_dict())
        model[2].weight[:] = narrow[2].weight
        model[2].bias[:] = narrow[2].bias
        model[4].weight.zero_()
        model[4].weight[:, 0:1] = narrow[4].weight
        model[4].bias[:] = narrow[4].bias
        assert torch.allclose(model(x[:8]), narrow(x[:8]), atol=1e-5)
    return model.eval()


def _harp_on_duplicates(tmp_path):
    images = _red_images()
    model = _duplicate_model(images)
    found, solve_for, _, record, _ = _solve(model, _params("harp", "prune.score_epochs=4"), images, 0.5, tmp_path, 2)
    return found, solve_for, record["learned"]["removal_rates"]


def test_harp_meets_the_budget_with_its_learned_rates(tmp_path):
    _, solve_for, rates = _harp_on_duplicates(tmp_path)
    assert len(set(rates)) > 1                         # the rates were learned, not left uniform
    assert 0.5 <= solve_for(0.5)["achieved"] < 0.51      # the tolerance of every method (tests/test_pruning.py)


def test_harp_learns_a_lower_keep_rate_for_a_group_of_duplicates(tmp_path):
    found, _, rates = _harp_on_duplicates(tmp_path)
    duplicates = next(i for i, g in enumerate(found) if g.root == "2")
    assert rates[duplicates] > max(r for i, r in enumerate(rates) if i != duplicates), rates


def test_score_learning_resumed_mid_run_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    params = _params("harp", "prune.score_epochs=2")
    images = _red_images(128)
    *_, whole, record_whole, _ = _solve(_signal_model(), params, images, 0.5, tmp_path / "whole", 2)
    batches = {"n": 0}

    def crash(name):
        batches["n"] += 1
        if batches["n"] == 3:    # the first batch of the second epoch (2 batches per epoch)
            raise KeyboardInterrupt

    monkeypatch.setattr(learned, "crash_point", crash)
    with pytest.raises(KeyboardInterrupt):
        _solve(_signal_model(), params, images, 0.5, tmp_path / "cut", 2)
    assert (tmp_path / "cut" / "step1" / learned.STATE_FILE).is_file()
    monkeypatch.setattr(learned, "crash_point", lambda name: None)
    *_, resumed, record_resumed, _ = _solve(_signal_model(), params, images, 0.5, tmp_path / "cut", 2)
    assert all(torch.equal(a, b) for a, b in zip(whole, resumed))
    assert record_resumed["learned"]["removal_rates"] == record_whole["learned"]["removal_rates"]
    assert [r["loss"] for r in record_resumed["learned"]["history"]] == [r["loss"] for r in
                                                                         record_whole["learned"]["history"]]


@pytest.mark.parametrize("arch", ["resnet18_w8", "mobilevit_xxs"])
@pytest.mark.parametrize("method", ["hydra", "harp"])
def test_learned_methods_prune_residual_and_attention_models_to_the_budget(arch, method, tmp_path):
    from mrpf.models import build_model

    model = build_model(arch, 10, SIZE).eval()
    gen = torch.Generator().manual_seed(5)
    images = ImageSet(torch.randint(0, 256, (64, 3, SIZE, SIZE), generator=gen, dtype=torch.uint8),
                      torch.randint(0, 10, (64,), generator=gen), [str(i) for i in range(10)])
    params = _params(method, "prune.score_epochs=1", "train.steps=1")
    found, solve_for, scores, _, dense = _solve(model, params, images, 0.5, tmp_path, 10)
    solved = solve_for(0.5)
    from mrpf import allocation

    pruned = copy.deepcopy(model)
    allocation.apply_ratios(pruned, SIZE, 10, solved["ratios"], 1, solved["caps"], scores)
    achieved = 1 - budget_counts(pruned, SIZE, None)["macs"] / dense["macs"]
    assert achieved == pytest.approx(solved["achieved"], abs=1e-12) and achieved >= 0.5   # these tiny widths
    # (8 channels) make coarse steps: the search takes the first width at or past the budget
    with torch.no_grad():
        assert pruned(torch.rand(2, 3, SIZE, SIZE)).shape == (2, 10)
