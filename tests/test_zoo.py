"""The robust model zoo's architectures: WideResNet and PreActResNet state dicts with
RobustBench's key names and shapes import with no key mapping, evaluate, get MRS, prune and
export; a physically pruned pre-activation model computes what the masked dense one does."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import pytest
import torch

from mrpf import groups
from mrpf.models import build_model

from .conftest import mrpf_cli as mrpf
from .conftest import tiny_overrides
from .robustbench_layout import robustbench_preact18, robustbench_wrn

ROOT = Path(__file__).resolve().parents[1]


ZOO = {"wrn16_4": lambda: robustbench_wrn(16, 4), "wrn10_1": lambda: robustbench_wrn(10, 1),
       "preact_resnet18": lambda: robustbench_preact18(),
       "preact_resnet18_v2": lambda: robustbench_preact18(bn_before_fc=True)}


def shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("arch", sorted(ZOO))
def test_the_registry_has_robustbenchs_keys_and_shapes(arch):
    assert shapes(build_model(arch, 10, 32).net.state_dict()) == shapes(ZOO[arch]())


def test_wrn28_10_has_robustbenchs_keys_and_its_36_5_m_parameters():
    net = build_model("wrn28_10", 10, 32).net
    assert shapes(net.state_dict()) == shapes(robustbench_wrn(28, 10))
    assert round(sum(p.numel() for p in net.parameters()) / 1e6, 1) == 36.5




SMALL = ["evaluate.n_images=32", "evaluate.attacks=[clean,pgd]", "evaluate.pgd_steps=1", "evaluate.step_size=null",
         "evaluate.latency_repeats=1", "evaluate.latency_batch=2", "evaluate.batch_size=32", "mrs.steps=1",
         "mrs.batch_size=32", "data.calibration_size=32", "prune.steps=1", "prune.finetune_epochs=0",
         "prune.final_epochs=0", "device.name=cpu"]


@pytest.mark.slow
@pytest.mark.parametrize("arch, method", [("wrn16_4", "mrpf"), ("preact_resnet18", "uniform_l1")])
def test_a_zoo_state_dict_imports_evaluates_gets_mrs_is_pruned_and_exported(tiny_data, tmp_path, arch, method):
    """Saved as a RobustBench checkpoint comes (nested under ``state_dict``, DataParallel's
    ``module.`` prefix), with no normalisation: imported as raw-pixel model, then every stage."""
    weights = tmp_path / f"{arch}.pt"
    state = ZOO[arch]()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 100}, weights)
    common = tiny_overrides(tiny_data) + SMALL
    done = mrpf("import", "--arch", arch, "--weights", str(weights), "--run", "zoo", *common, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    checkpoint = tmp_path / "runs/zoo/checkpoint.pt"
    saved = torch.load(checkpoint, weights_only=True)
    assert all(torch.equal(saved["state_dict"][f"net.{k}"], v) for k, v in state.items())
    assert saved["arch"]["mean"] == [0.0] * 3 and saved["arch"]["std"] == [1.0] * 3
    assert json.loads((tmp_path / "runs/zoo/eval.json").read_text())["n_images"] == 32
    prune = ["prune", "--run", "pruned", "--checkpoint", str(checkpoint), "--method", method, "--sparsity", "0.5"]
    export = ["export", "--checkpoint", str(tmp_path / "runs/pruned/checkpoint.pt"), "--out", str(tmp_path / "deploy")]
    steps = [prune, export]
    if method == "mrpf":   # MRS once, reused by the prune (the pipeline's order), with the paper's rule
        steps.insert(0, ["mrs", "--run", "mrs", "--checkpoint", str(checkpoint)])
        prune += ["--mrs", str(tmp_path / "runs/mrs/mrs.json"), "prune.allocation=inverse_mrs"]
    for args in steps:
        done = mrpf(*args, *(common if args[0] != "export" else []), cwd=tmp_path)
        assert done.returncode == 0, (args, done.stderr[-2000:])
    prune = json.loads((tmp_path / "runs/pruned/prune.json").read_text())
    assert abs(prune["achieved"] - 0.5) <= 0.01
    assert (tmp_path / "deploy/model.onnx").is_file()
    if method == "mrpf":
        assert len(json.loads((tmp_path / "runs/mrs/mrs.json").read_text())["groups"]) > 3


@pytest.mark.parametrize("edit, named", [
    (lambda s: s.pop("block2.layer.0.convShortcut.weight"), "missing keys block2.layer.0.convShortcut.weight"),
    (lambda s: s.update({"sub_block1.layer.0.conv1.weight": torch.zeros(1)}), "unexpected keys sub_block1.layer.0"),
])
def test_a_missing_or_unexpected_key_is_one_error_naming_it(tiny_data, tmp_path, edit, named):
    state = robustbench_wrn(10, 1)
    edit(state)
    torch.save(state, tmp_path / "w.pt")
    done = mrpf("import", "--arch", "wrn10_1", "--weights", str(tmp_path / "w.pt"), "--run", "zoo",
                *tiny_overrides(tiny_data), cwd=tmp_path)
    assert done.returncode == 2 and named in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs/zoo").exists() or not any((tmp_path / "runs/zoo").iterdir())


def test_a_wideresnet_depth_that_is_not_6n_plus_4_is_one_line(tmp_path):
    done = mrpf("train", "--run", "x", "model.arch=wrn30_10", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "mrpf: error: model.arch: wrn30_10: a WideResNet's depth is 6n + 4 (10, 16, 22, 28, 34, 40, ...) and its "
        "widen factor at least 1, got depth 30, widen factor 10"]


def test_robustbench_mu_sigma_buffers_are_the_files_normalisation(tiny_data, tmp_path):
    """RobustBench models that normalise inside (e.g. Rice2020OverfittingNetL2) carry ``mu`` /
    ``sigma`` buffers: the import takes them as the model's normalisation."""
    state = robustbench_wrn(10, 1)
    state["mu"] = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    state["sigma"] = torch.tensor([0.2471, 0.2435, 0.2616]).view(1, 3, 1, 1)
    torch.save(state, tmp_path / "w.pt")
    done = mrpf("import", "--arch", "wrn10_1", "--weights", str(tmp_path / "w.pt"), "--run", "zoo", "--no-evaluate",
                *tiny_overrides(tiny_data), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    arch = torch.load(tmp_path / "runs/zoo/checkpoint.pt", weights_only=True)["arch"]
    assert arch["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])
    assert arch["std"] == pytest.approx([0.2471, 0.2435, 0.2616])


@pytest.mark.parametrize("arch", ["wrn16_4_w4", "wrn10_1", "preact_resnet18_w8", "preact_resnet18_v2_w8"])
def test_the_physically_pruned_model_gives_the_masked_dense_models_logits(arch):
    """Pre-activation blocks (BN before the convolution, a stage's residual adds, the 1x1
    shortcut of the activated or the raw input): removing a third of every group's channels
    gives the logits of the dense model with those channels zeroed."""
    torch.manual_seed(0)
    model = build_model(arch, 10, 32, activation="silu")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    x = torch.rand(4, 3, 32, 32)
    pruned = copy.deepcopy(model)
    _, found = groups.find_groups(model, 32, 10)
    remove = {g.id: list(range(1, g.channels, 3)) for g in found}
    with contextlib.ExitStack() as stack, torch.no_grad():
        for g in found:
            stack.enter_context(groups.masked(model, g, torch.tensor(remove[g.id])))
        masked_logits = model(x)
    graph, found_p = groups.find_groups(pruned, 32, 10)
    assert [g.root for g in found_p] == [g.root for g in found]
    groups.prune(graph, found_p, remove)
    with torch.no_grad():
        pruned_logits = pruned(x)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert torch.allclose(pruned_logits, masked_logits, atol=1e-5, rtol=1e-4)
