"""`mrpf export`: a pruned checkpoint as ONNX and .pt2 files that give mrpf's logits, and the
same robust accuracy on the same adversarial images, without mrpf."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mrpf.attacks import pgd
from mrpf.config import load_params
from mrpf.data import read_npz
from mrpf.devices import setup
from mrpf.export import onnx_logits, pt2_logits
from mrpf.models import load_model
from mrpf.pruning import run_prune

from .conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tiny_data, trained_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("export")
    params = load_params(None, tiny_overrides(tiny_data) + ["prune.method=uniform_l1", "prune.sparsity=0.5",
                                                            "prune.steps=1", "prune.finetune_epochs=0",
                                                            "prune.final_epochs=0"])
    run_prune(params, trained_checkpoint, folder / "pruned", log=lambda m: None)
    done = subprocess.run([sys.executable, "-m", "mrpf", "export", "--checkpoint", str(folder / "pruned/checkpoint.pt"),
                           "--out", str(folder / "out")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "pruned/checkpoint.pt", folder / "out"


@pytest.mark.slow
def test_exported_files_give_mrpfs_logits_and_robust_accuracy(tiny_data, exported):
    checkpoint, out = exported
    summary = json.loads((out / "export.json").read_text())
    assert summary["pruned"] and max(summary["max_abs_logit_difference"].values()) <= 1e-4
    model, _ = load_model(checkpoint, setup(load_params(None, ["device.name=cpu"]).device))
    test = read_npz(tiny_data["test"])
    x, y = test.x[:100].float().div(255).contiguous(), test.y[:100]
    torch.manual_seed(0)
    x_adv = pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=20)
    with torch.no_grad():
        ours_clean, ours_adv = model(x), model(x_adv)
    for images, ours in ((x, ours_clean), (x_adv, ours_adv)):          # any batch size: dynamic batch
        assert np.abs(onnx_logits(out / "model.onnx", images.numpy()) - ours.numpy()).max() <= 1e-4
        assert (pt2_logits(out / "model.pt2", images) - ours).abs().max() <= 1e-4
    robust = (ours_adv.argmax(1) == y).float().mean().item()
    assert (onnx_logits(out / "model.onnx", x_adv.numpy()).argmax(1) == y.numpy()).mean() == pytest.approx(robust)
    assert (pt2_logits(out / "model.pt2", x_adv).argmax(1) == y).float().mean().item() == pytest.approx(robust)
    one = x[:1].numpy()
    assert onnx_logits(out / "model.onnx", one).shape == (1, 10)
