import copy

import pytest
import torch
import torch.nn as nn

from mrpf import allocation, groups, selection
from mrpf.config import DeviceParams, load_params
from mrpf.data import ImageSet, load_splits
from mrpf.devices import setup
from mrpf.models import build_model, load_model
from mrpf.objectives import Adversary
from mrpf.pruning import candidate_tuner, run_prune

from .conftest import tiny_overrides
from .test_pruning import PRUNE, dense  # noqa: F401  (the module's dense checkpoint fixture)


def test_adaptive_batchnorm_sets_the_statistics_of_the_given_inputs():
    """EagleEye's adaptive BN: the running mean and (unbiased) variance become the plain average
    over all the batches given, whatever they were and whatever the momentum."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.5))
    model[1].running_mean.fill_(7.0)
    model[1].running_var.fill_(9.0)
    inputs = [torch.randn(8, 3, 6, 6) + i for i in range(3)]
    selection.adapt_batchnorm(model, inputs)
    with torch.no_grad():
        features = [model[0](x).transpose(0, 1).flatten(1) for x in inputs]
    means = torch.stack([f.mean(1) for f in features])
    variances = torch.stack([f.var(1, unbiased=True) for f in features])
    assert torch.allclose(model[1].running_mean, means.mean(0), atol=1e-5)
    assert torch.allclose(model[1].running_var, variances.mean(0), atol=1e-5)
    assert model[1].momentum == 0.5 and not model.training


def test_the_strength_with_the_lowest_robust_loss_is_chosen(monkeypatch):
    """select_strength prunes a copy per strength, adapts its BN, scores it by robust loss and
    returns the solve result of the lowest; the unpruned model is left as it was."""
    torch.manual_seed(0)
    model = build_model("vgg11_w4", 10, 32).eval()
    _, found = groups.find_groups(model, 32, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mrs = torch.rand(len(found), generator=torch.Generator().manual_seed(1)).add(0.05).tolist()
    losses = [3.0, 2.0, 1.5, 2.5, 4.0]    # the candidates' robust losses, in the order of STRENGTHS
    calls, widths = [], []

    def scored(scored_model, batches, adversary, fixed, seed):   # first call: the unpruned model's attack
        calls.append(scored_model)
        loss = losses[len(calls) - 2] if len(calls) > 1 else 0.0
        return loss, 0.0, [torch.zeros_like(x) for x, _ in batches]

    def solve_at(strength):
        out = allocation.solve(model, found, mrs, input_size=32, num_classes=10, budget=0.5, strength=strength)
        widths.append(tuple(out["ratios"]))
        return out

    monkeypatch.setattr(selection, "robust_loss", scored)
    calibration = ImageSet(torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8),
                           torch.zeros(16, dtype=torch.long), [str(c) for c in range(10)])
    adversary = Adversary(eps=8 / 255, step_size=2 / 255, steps=1)
    best, rows = selection.select_strength(solve_at, model, calibration, adversary, setup(DeviceParams(name="cpu")),
                                           8, 32, 10, 1)
    assert calls[0] is model and all(c is not model for c in calls[1:]) and len(calls) == 6
    assert len(set(widths)) == len(selection.STRENGTHS)                # distinct candidates
    assert [r["strength"] for r in rows] == list(selection.STRENGTHS)
    assert [r["robust_loss"] for r in rows] == losses
    assert best["ratios"] == rows[2]["ratios"] == list(widths[2])      # strength 0.5, the lowest
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_each_candidate_is_tuned_after_adaptive_batchnorm_and_before_it_is_scored(monkeypatch):
    """With ``tune``, every pruned copy (never the unpruned model) is fine-tuned once, after its
    BN statistics were re-estimated, and the robust loss is that of the tuned copy."""
    torch.manual_seed(0)
    model = build_model("vgg11_w4", 10, 32).eval()
    _, found = groups.find_groups(model, 32, 10)
    events = []

    def adapted(pruned, inputs):
        events.append(("bn", pruned))

    def tune(pruned):
        events.append(("tune", pruned))
        pruned.tuned = True

    def scored(scored_model, batches, adversary, fixed, seed):
        events.append(("score", scored_model))
        tuned = getattr(scored_model, "tuned", False)
        return (1.0 if tuned else 9.0), 0.0, [torch.zeros_like(x) for x, _ in batches]

    monkeypatch.setattr(selection, "adapt_batchnorm", adapted)
    monkeypatch.setattr(selection, "robust_loss", scored)
    calibration = ImageSet(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8),
                           torch.zeros(8, dtype=torch.long), [str(c) for c in range(10)])
    solve_at = lambda strength: allocation.solve(model, found, [1.0] * len(found), input_size=32,  # noqa: E731
                                                 num_classes=10, budget=0.5, strength=strength)
    _, rows = selection.select_strength(solve_at, model, calibration, Adversary(eps=8 / 255, step_size=2 / 255,
                                        steps=1), setup(DeviceParams(name="cpu")), 8, 32, 10, 1, tune=tune)
    assert events[0] == ("score", model)                      # the unpruned model's attack, untuned
    candidates = events[1:]
    assert [kind for kind, _ in candidates] == ["bn", "tune", "score"] * len(selection.STRENGTHS)
    assert all(m is candidates[i][1] for i in range(0, len(candidates), 3) for _, m in candidates[i:i + 3])
    assert [r["robust_loss"] for r in rows] == [1.0] * len(selection.STRENGTHS)
    assert not hasattr(model, "tuned")


def test_candidate_tuner_trains_every_candidate_on_the_same_batches(tiny_data):
    """prune.search_finetune_batches: the tuner changes a copy's weights and gives two copies of
    one model the same weights (same batches and attack starts), another pruning step other
    batches; at 0 batches it is off (None)."""
    overrides = tiny_overrides(tiny_data) + ["prune.allocation=joint_search", "train.steps=1"]
    runtime = setup(DeviceParams(name="cpu"))
    off = load_params(None, overrides)
    splits = load_splits(off.data, with_test=False)
    assert candidate_tuner(off, splits.train, splits.spec, runtime, None, 1) is None
    params = load_params(None, overrides + ["prune.search_finetune_batches=2"])
    tune = candidate_tuner(params, splits.train, splits.spec, runtime, None, 1)
    torch.manual_seed(0)
    model = build_model("vgg11_w8", 10, 32).eval()
    first, second = copy.deepcopy(model), copy.deepcopy(model)
    tune(first)
    tune(second)
    before, after, again = model.state_dict(), first.state_dict(), second.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    assert all(torch.equal(after[k], again[k]) for k in after)
    assert not first.training
    other_step = candidate_tuner(params, splits.train, splits.spec, runtime, None, 2)
    third = copy.deepcopy(model)
    other_step(third)
    assert any(not torch.equal(after[k], third.state_dict()[k]) for k in after if k.endswith("weight"))


@pytest.mark.slow
def test_joint_search_with_candidate_fine_tuning_scores_the_tuned_copies(tiny_data, dense, tmp_path):  # noqa: F811
    """End to end: with prune.search_finetune_batches the same candidates are scored after their
    short fine-tune (other robust losses than after adaptive BN alone), the lowest is chosen and
    the budget is met."""
    base = tiny_overrides(tiny_data) + PRUNE + ["prune.method=mrpf", "prune.sparsity=0.5", "prune.steps=1",
                                                "prune.final_epochs=0", "prune.finetune_epochs=0",
                                                "prune.allocation=joint_search"]
    plain = run_prune(load_params(None, base), dense, tmp_path / "bn", log=lambda m: None)["steps"][0]["search"]
    summary = run_prune(load_params(None, base + ["prune.search_finetune_batches=3", "prune.finetune_lr=0.05"]),
                        dense, tmp_path / "tuned", log=lambda m: None)
    rows = summary["steps"][0]["search"]
    assert [r["ratios"] for r in rows] == [r["ratios"] for r in plain]    # the same candidates
    assert all(t["robust_loss"] != p["robust_loss"] for t, p in zip(rows, plain))
    assert summary["steps"][0]["ratios"] == min(rows, key=lambda r: r["robust_loss"])["ratios"]
    assert abs(summary["achieved"] - 0.5) <= 0.01


@pytest.mark.slow
def test_joint_search_prunes_with_the_chosen_candidates_ratios(tiny_data, dense, tmp_path):  # noqa: F811
    """prune.allocation: joint_search records every candidate in prune.json and prunes the
    model to the ratios of the one with the lowest robust loss, at the budget."""
    params = load_params(None, tiny_overrides(tiny_data) + PRUNE + [
        "prune.method=mrpf", "prune.sparsity=0.5", "prune.steps=1", "prune.allocation=joint_search"])
    summary = run_prune(params, dense, tmp_path / "p", log=lambda m: None)
    step = summary["steps"][0]
    rows = step["search"]
    assert [r["strength"] for r in rows] == list(selection.STRENGTHS)
    chosen = min(rows, key=lambda r: r["robust_loss"])
    assert step["ratios"] == chosen["ratios"] and abs(summary["achieved"] - 0.5) <= 0.01
    assert len(set(rows[0]["ratios"])) == 1                            # strength 0: uniform
    model, _ = load_model(tmp_path / "p" / "checkpoint.pt", setup(params.device))
    _, found = groups.find_groups(model, 32, 10)
    kept = [g["channels"] - round(r * g["channels"]) for g, r in zip(step["groups"], chosen["ratios"])]
    assert [g.channels for g in found] == kept
