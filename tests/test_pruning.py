import json
import subprocess
import sys

import pytest
import torch

from mrpf.config import load_params
from mrpf.devices import setup
from mrpf.evaluation import load_model
from mrpf.pruning import METHODS, run_prune
from mrpf.training import train

from .conftest import tiny_overrides

PRUNE = ["prune.steps=2", "prune.finetune_epochs=1", "prune.final_epochs=0", "mrs.steps=2", "mrs.batch_size=64"]


@pytest.fixture(scope="module")
def dense(tiny_data, tmp_path_factory):
    params = load_params(None, tiny_overrides(tiny_data) + ["train.epochs=2", "model.arch=vgg11_w4"])
    run = tmp_path_factory.mktemp("dense")
    train(params, run, log=lambda m: None)
    return run / "checkpoint.pt"


@pytest.mark.parametrize("method", METHODS)
def test_every_method_prunes_to_the_budget_and_fine_tunes(tiny_data, dense, tmp_path, method):
    params = load_params(None, tiny_overrides(tiny_data) + PRUNE + [f"prune.method={method}", "prune.sparsity=0.5"])
    summary = run_prune(params, dense, tmp_path / "p", log=lambda m: None)
    assert abs(summary["achieved"] - 0.5) <= 0.01
    assert [round(s["budget"], 3) for s in summary["steps"]] == [0.25, 0.5]
    assert abs(summary["steps"][0]["achieved"] - 0.25) <= 0.01
    assert all(0 <= r <= 0.9 + 1e-9 for s in summary["steps"] for r in s["ratios"])
    if method in ("mrpf", "mrpf_clean"):
        assert all(row["mrs"] > 0 for row in summary["steps"][0]["mrs"]["groups"])
    model, state = load_model(tmp_path / "p" / "checkpoint.pt", setup(params["device"]))
    assert state["arch"]["pruning_history"]
    assert sum(p.numel() for p in model.parameters()) < 0.75 * 579_098
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def mrpf(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mrpf", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_mrs_writes_json_and_chart_then_prune_and_evaluate(tiny_data, dense, tmp_path):
    overrides = tiny_overrides(tiny_data) + PRUNE
    done = mrpf("mrs", "--run", "m", "--checkpoint", str(dense), *overrides, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "runs" / "m" / "mrs.json").read_text())
    assert {"id", "root", "members", "channels", "mrs", "probe_loss", "probe_acc", "ratio"} <= set(result["groups"][0])
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
