"""The CUDA path: bf16 autocast, channels_last, evaluation on the GPU (skipped without CUDA)."""

import pytest
import torch

from mrpf import attacks
from mrpf.config import load_params
from mrpf.devices import setup
from mrpf.evaluation import evaluate, load_model
from mrpf.training import train

from .conftest import tiny_overrides

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible)")]


@pytest.mark.parametrize("bf16", [False, True])
def test_train_and_evaluate_on_cuda(tiny_data, tmp_path, bf16):
    params = load_params(None, tiny_overrides(tiny_data) + ["device.name=cuda", f"device.bf16={bf16}",
                                                            "evaluate.autoattack_images=16"])
    summary = train(params, tmp_path / "run", log=lambda m: None)
    assert summary["train_loss"] == summary["train_loss"]   # finite, not NaN
    metrics = evaluate(params, tmp_path / "run" / "checkpoint.pt", tmp_path / "run" / "eval.json", log=lambda m: None)
    assert metrics["device"].startswith("cuda") and metrics["latency_ms"] > 0
    assert metrics["pgd_acc"] <= metrics["clean_acc"]
    # the checkpoint written on the GPU loads on the CPU and gives (nearly) the same logits
    gpu_model, _ = load_model(tmp_path / "run" / "checkpoint.pt", setup(params["device"]))
    cpu_model, _ = load_model(tmp_path / "run" / "checkpoint.pt",
                              setup({**params["device"], "name": "cpu", "bf16": False}))
    x = torch.rand(8, 3, 32, 32)
    # cuDNN convolutions default to TF32 (10-bit mantissa): compare in full fp32
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        assert torch.allclose(gpu_model(x.cuda()).cpu(), cpu_model(x), atol=1e-3, rtol=1e-3)


def test_attack_on_cuda_restores_state_and_respects_the_ball():
    from mrpf.models import build_model

    model = build_model("vgg11_w8", 10, 32).cuda().train()
    x, y = torch.rand(16, 3, 32, 32, device="cuda"), torch.arange(16, device="cuda") % 10
    x_adv = attacks.pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=5)
    assert model.training and all(p.grad is None and p.requires_grad for p in model.parameters())
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
