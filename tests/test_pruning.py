import copy
import json

import pytest
import torch
import torch.nn.functional as F

from mrpf import groups, scoring
from mrpf.config import PRUNE_METHODS, load_params
from mrpf.data import ImageSet
from mrpf.devices import setup
from mrpf.errors import MrpfError
from mrpf.io import load_checkpoint
from mrpf.models import Classifier, load_model
from mrpf.pruning import run_prune
from mrpf.training import train

from .conftest import mrpf_cli as mrpf
from .conftest import tiny_overrides

PRUNE = ["prune.steps=2", "prune.finetune_epochs=1", "prune.final_epochs=0", "mrs.steps=2", "mrs.batch_size=64"]


@pytest.fixture(scope="module")
def dense(tiny_data, tmp_path_factory):
    params = load_params(None, tiny_overrides(tiny_data) + ["train.epochs=2", "model.arch=vgg11_w4"])
    run = tmp_path_factory.mktemp("dense")
    train(params, run, log=lambda m: None)
    return run / "checkpoint.pt"


@pytest.mark.parametrize("method", PRUNE_METHODS)
def test_every_method_prunes_to_the_budget_and_fine_tunes(tiny_data, dense, tmp_path, method, monkeypatch):
    from mrpf import training

    optimiser_steps = []

    def counting(*args, **kwargs):
        optimiser = make_optimizer(*args, **kwargs)
        optimiser.register_step_post_hook(lambda *_: optimiser_steps.append(1))
        return optimiser

    make_optimizer = training.make_optimizer
    monkeypatch.setattr(training, "make_optimizer", counting)
    params = load_params(None, tiny_overrides(tiny_data) + PRUNE + [f"prune.method={method}", "prune.sparsity=0.5"])
    summary = run_prune(params, dense, tmp_path / "p", log=lambda m: None)
    # every method: the same fine-tuning budget, 2 steps x 1 epoch x ceil(500 / 64) batches
    assert len(optimiser_steps) == 2 * 8
    assert abs(summary["achieved"] - 0.5) <= 0.01
    assert [round(s["budget"], 3) for s in summary["steps"]] == [0.25, 0.5]
    assert abs(summary["steps"][0]["achieved"] - 0.25) <= 0.01
    assert all(0 <= r <= 0.9 + 1e-9 for s in summary["steps"] for r in s["ratios"])
    if method in ("mrpf", "mrpf_clean"):
        result = summary["steps"][0]["mrs"]
        for row in result["groups"]:
            assert row["mrs"] == pytest.approx(max(1e-6, (row["probe_loss"] - result["base_loss"])
                                                   / result["base_loss"]), rel=1e-9)
    model, state = load_model(tmp_path / "p" / "checkpoint.pt", setup(params.device))
    assert state["arch"]["pruning_history"]
    assert sum(p.numel() for p in model.parameters()) < 0.75 * 579_098
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_cli_mrs_writes_json_and_chart_then_prune_and_evaluate(tiny_data, dense, tmp_path):
    overrides = tiny_overrides(tiny_data) + PRUNE
    done = mrpf("mrs", "--run", "m", "--checkpoint", str(dense), *overrides, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "runs" / "m" / "mrs.json").read_text())
    assert {"id", "root", "members", "channels", "mrs", "probe_loss", "probe_acc"} <= set(result["groups"][0])
    assert [a["sparsity"] for a in result["allocation"]] == [0.5]
    assert len(result["allocation"][0]["ratios"]) == len(result["groups"])
    assert (tmp_path / "runs" / "m" / "mrs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    done = mrpf("prune", "--run", "p", "--checkpoint", str(dense), "--method", "mrpf", "--sparsity", "0.3",
                *overrides, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    done = mrpf("evaluate", "--run", "p", *overrides, "evaluate.attacks=[clean,pgd]", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "runs" / "p" / "eval.json").read_text())
    dense_macs = json.loads((tmp_path / "runs" / "p" / "prune.json").read_text())["dense"]["macs"]
    assert abs(1 - metrics["macs"] / dense_macs - 0.3) <= 0.01


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.5"], "prune.sparsity: must lie in (0, 1)"),
    (["--method", "l2_norm"], "prune.method: unknown value 'l2_norm'"),
])
def test_cli_prune_bad_input(tiny_data, dense, tmp_path, args, message):
    done = mrpf("prune", "--run", "p", "--checkpoint", str(dense), *args, *tiny_overrides(tiny_data), cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr


def small_model():
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 10))
    model = Classifier(net, (0.5,) * 3, (0.25,) * 3).eval()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    _, found = groups.find_groups(model, 8, 10)
    return model, found


def test_global_magnitude_scores_are_mean_absolute_weights_of_the_groups_channels():
    model, found = small_model()
    conv, bn = model.net[0], model.net[1]
    expected = ((conv.weight.abs().sum((1, 2, 3)) + conv.bias.abs() + bn.weight.abs() + bn.bias.abs())
                / (27 + 1 + 1 + 1))
    first = next(g for g in found if g.root == "net.0")
    assert torch.allclose(scoring.mean_magnitude(model, first), expected.detach())


def test_taylor_adv_scores_are_first_order_taylor_importance_on_the_calibration_set():
    """With eps = 0 the adversarial examples are the images: |sum_w w * dCE_sum/dw| per channel."""
    model, found = small_model()
    gen = torch.Generator().manual_seed(4)
    calibration = ImageSet(torch.randint(0, 256, (20, 3, 8, 8), generator=gen, dtype=torch.uint8),
                           torch.randint(0, 10, (20,), generator=gen), [str(i) for i in range(10)])
    params = load_params(None, ["attack.eps=0", "mrs.steps=1", "mrs.batch_size=8", "device.name=cpu"])
    runtime = setup(params.device)
    scores = scoring.taylor_adv(model, found, calibration, params, runtime)
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(calibration.x.float() / 255), calibration.y, reduction="sum").backward()
    conv, bn = reference.net[0], reference.net[1]
    by_hand = ((conv.weight * conv.weight.grad).sum((1, 2, 3)) + conv.bias * conv.bias.grad
               + bn.weight * bn.weight.grad + bn.bias * bn.bias.grad).abs()
    first = [g.root for g in found].index("net.0")
    assert torch.allclose(scores[first], by_hand.detach(), rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_random_scores_are_uniform_and_new_at_every_step():
    _, found = small_model()
    step1, step2 = scoring.random_scores(found, 0, 1), scoring.random_scores(found, 0, 2)
    assert all(((s >= 0) & (s < 1)).all() for s in step1)
    assert not any(torch.equal(a, b) for a, b in zip(step1, step2))
    assert all(torch.equal(a, b) for a, b in zip(step1, scoring.random_scores(found, 0, 1)))


@pytest.mark.slow
def test_r_max_holds_against_the_dense_width_over_all_steps(tiny_data, dense, tmp_path):
    """global_magnitude sends its cuts to few groups: over 3 steps none may lose more than
    floor(r_max * dense width) channels."""
    params = load_params(None, tiny_overrides(tiny_data) + PRUNE + [
        "prune.method=global_magnitude", "prune.sparsity=0.6", "prune.r_max=0.5", "prune.steps=3",
        "prune.finetune_epochs=0"])
    summary = run_prune(params, dense, tmp_path / "p", log=lambda m: None)
    widths = {g["root"]: g["channels"] for g in summary["steps"][0]["groups"]}
    model, state = load_model(tmp_path / "p" / "checkpoint.pt", setup(params.device))
    _, kept = groups.find_groups(model, 32, 10)
    assert all(g.channels >= widths[g.root] - int(0.5 * widths[g.root]) for g in kept)
    assert any(g.channels == widths[g.root] - int(0.5 * widths[g.root]) for g in kept)   # the cap binds
    # prune.json records the allocation the run ended with, in layer order (the report reads it)
    kept_by_root = {g.root: g.channels for g in kept}
    in_layer_order = [name for name, _ in model.named_modules() if name in kept_by_root]
    assert summary["widths"] == [[r, kept_by_root[r], widths[r]] for r in in_layer_order]
    assert json.loads((tmp_path / "p" / "prune.json").read_text())["widths"] == summary["widths"]


@pytest.mark.slow
def test_mrpf_reuses_the_mrs_stage_result_and_refuses_one_of_other_settings(tiny_data, dense, tmp_path):
    """Step 1 with the mrs stage's mrs.json gives the same pruned model as measuring MRS again."""
    from mrpf.sensitivity import run_mrs

    params = load_params(None, tiny_overrides(tiny_data) + PRUNE + ["prune.method=mrpf", "prune.sparsity=0.4"])
    result = run_mrs(params, dense, tmp_path / "m", log=lambda m: None, sparsities=[0.4, 0.6])
    assert [a["sparsity"] for a in result["allocation"]] == [0.4, 0.6]
    measured = run_prune(params, dense, tmp_path / "measured", log=lambda m: None)
    lines = []
    reused = run_prune(params, dense, tmp_path / "reused", log=lines.append, mrs_path=tmp_path / "m" / "mrs.json")
    assert "step 1: MRS of the dense model from the mrs stage" in lines
    assert [r["mrs"] for r in reused["steps"][0]["mrs"]["groups"]] == \
        [r["mrs"] for r in measured["steps"][0]["mrs"]["groups"]]
    assert [s["ratios"] for s in reused["steps"]] == [s["ratios"] for s in measured["steps"]]
    a = load_checkpoint(tmp_path / "measured" / "checkpoint.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "reused" / "checkpoint.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = load_params(None, tiny_overrides(tiny_data) + PRUNE + ["prune.method=mrpf", "prune.sparsity=0.4",
                                                                  "mrs.probe_ratio=0.25"])
    with pytest.raises(MrpfError, match="measured with other settings"):
        run_prune(other, dense, tmp_path / "other", log=lambda m: None, mrs_path=tmp_path / "m" / "mrs.json")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["uniform_l1", "mrpf"])
def test_rslad_fine_tunes_the_pruned_student_from_the_unchanged_dense_teacher(tiny_data, dense, tmp_path, method,
                                                                             monkeypatch):
    """Distillation is open to every method: the same optimiser steps as TRADES, each loss
    computed against the dense model's soft labels, and the dense checkpoint left as it was."""
    from mrpf import objectives

    teachers = []
    rslad = objectives.DISTILLATION["rslad"]

    def spy(model, x, y, adv, beta, *, teacher):
        teachers.append(teacher)
        return rslad(model, x, y, adv, beta, teacher=teacher)

    monkeypatch.setitem(objectives.DISTILLATION, "rslad", spy)
    before = dense.read_bytes()
    params = load_params(None, tiny_overrides(tiny_data) + PRUNE + [f"prune.method={method}", "prune.sparsity=0.5",
                                                                    "prune.finetune_method=rslad"])
    summary = run_prune(params, dense, tmp_path / "p", log=lambda m: None)
    assert len(teachers) == 2 * 8 and len({id(t) for t in teachers}) == 1
    assert [s["finetune"]["method"] for s in summary["steps"]] == ["rslad", "rslad"]
    teacher = teachers[0]
    reference, _ = load_model(dense, setup(params.device))
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), reference.state_dict().values()))
    assert not teacher.training and dense.read_bytes() == before


@pytest.mark.slow
def test_loss_curve_allocation_prunes_from_measured_curves_and_reuses_the_mrs_stage(tiny_data, dense, tmp_path):
    """prune.allocation: loss_curve probes each group at mrs.curve_ratios (the MRS ratio not
    again), meets the budget, and reuses an mrs.json only when it holds those curves."""
    from mrpf.sensitivity import run_mrs

    curve = ["prune.method=mrpf", "prune.sparsity=0.5", "prune.steps=1", "prune.allocation=loss_curve"]
    params = load_params(None, tiny_overrides(tiny_data) + PRUNE + curve)
    summary = run_prune(params, dense, tmp_path / "p", log=lambda m: None)
    step = summary["steps"][0]
    assert step["curves"]["ratios"] == [0.25, 0.5, 0.75] and abs(summary["achieved"] - 0.5) <= 0.01
    assert [row[1] for row in step["curves"]["increase"]] == [g["mrs"] for g in step["mrs"]["groups"]]
    assert len(step["curves"]["increase"]) == len(step["groups"])
    inverse = load_params(None, tiny_overrides(tiny_data) + PRUNE + curve[:-1])
    run_mrs(inverse, dense, tmp_path / "plain", log=lambda m: None)            # an mrs.json without curves
    with pytest.raises(MrpfError, match="measured with other curve_ratios"):
        run_prune(params, dense, tmp_path / "q", log=lambda m: None, mrs_path=tmp_path / "plain" / "mrs.json")
    run_mrs(params, dense, tmp_path / "m", log=lambda m: None)
    reused = run_prune(params, dense, tmp_path / "r", log=lambda m: None, mrs_path=tmp_path / "m" / "mrs.json")
    assert reused["steps"][0]["ratios"] == step["ratios"]


def test_a_latency_budget_prunes_to_the_predicted_time_and_reports_the_measured_one(tiny_data, dense, tmp_path,
                                                                                    fake_clock):
    """prune.metric: latency measures the table in the run folder, meets the budget on its
    prediction at every step, and reports the pruned model's measured time beside it (the
    table's reuse: tests/test_latency.py). Timed by the stand-in clock (conftest.fake_clock):
    a real one makes the tiny model's time mostly overhead, and the budget a matter of noise."""
    from mrpf.latency import TABLE_FILE

    params = load_params(None, tiny_overrides(tiny_data) + PRUNE + [
        "prune.method=uniform_l1", "prune.sparsity=0.5", "prune.metric=latency", "prune.finetune_epochs=0"])
    logs = []
    summary = run_prune(params, dense, tmp_path / "p", log=logs.append)
    assert summary["metric"] == "latency" and (tmp_path / "p" / TABLE_FILE).is_file()
    assert 0.5 <= summary["achieved"] <= 0.55 and 0.25 <= summary["steps"][0]["achieved"] <= 0.3
    assert summary["achieved"] == pytest.approx(1 - summary["counts"]["latency"] / summary["dense"]["latency"])
    timed = summary["measured_latency_ms"]
    assert timed["batch"] == 8 and timed["dense"] > timed["pruned"] > 0
    assert summary["measured_achieved"] == pytest.approx(1 - timed["pruned"] / timed["dense"])
    # the stand-in clock: the table is exact for the dense model and, its overhead being small, close after
    assert timed["dense"] == pytest.approx(summary["dense"]["latency"])
    assert summary["measured_achieved"] == pytest.approx(summary["achieved"], abs=0.01)
    assert any("latency: predicted" in line and "measured" in line for line in logs)


@pytest.mark.parametrize("method", ["uniform_l1", "global_magnitude"])
def test_a_latency_budget_is_met_on_the_measured_time_where_the_table_misses_it(tiny_data, dense, tmp_path,
                                                                                fake_clock, monkeypatch, method):
    """A whole model slower than its layers by a fixed cost (here 30 % of the dense layers' time,
    as framework overhead can be) makes the table's prediction optimistic for a pruned model:
    planned on the table alone a step misses its budget; each step then measures its candidate
    against the dense model and corrects the target until the measured time meets the budget
    (mrpf.latency.calibrate), for the allocation rules and the global thresholds alike."""
    from mrpf import timing
    from mrpf.latency import CALIBRATION_TOLERANCE

    from . import conftest

    params = load_params(None, tiny_overrides(tiny_data) + PRUNE + [
        f"prune.method={method}", "prune.sparsity=0.5", "prune.metric=latency", "prune.finetune_epochs=0"])
    model, state = load_model(dense, setup(params.device))
    layers = timing.latency_ms(model.eval(), state["arch"]["input_size"], setup(params.device), 8, 1)
    monkeypatch.setattr(conftest, "OVERHEAD_MS", 0.3 * (layers - conftest.OVERHEAD_MS))
    logs = []
    summary = run_prune(params, dense, tmp_path / "p", log=logs.append)
    for step, budget in zip(summary["steps"], (0.25, 0.5)):
        rounds = step["latency_calibration"]
        assert rounds[0]["target"] == budget and budget - rounds[0]["measured"] > 0.05   # the table alone misses
        assert min(abs(r["measured"] - budget) for r in rounds) <= CALIBRATION_TOLERANCE * (1 - budget)
        assert rounds[-1]["target"] > budget and rounds[-1]["predicted"] > budget
    assert summary["measured_achieved"] == pytest.approx(0.5, abs=CALIBRATION_TOLERANCE * 0.5)
    assert any("latency calibration 2" in line for line in logs)
