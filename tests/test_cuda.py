"""The CUDA path: bf16 autocast, channels_last, CUDA graphs, evaluation on the GPU (skipped without CUDA)."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mrpf import attacks
from mrpf.config import DeviceParams, load_params
from mrpf.devices import setup
from mrpf.evaluation import evaluate
from mrpf.gradient_step import GradientStep
from mrpf.models import build_model, load_model
from mrpf.objectives import OBJECTIVES, Adversary
from mrpf.training import train

from .conftest import tiny_overrides

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible)")]


@pytest.mark.parametrize("bf16", [False, True])
def test_train_and_evaluate_on_cuda(tiny_data, tmp_path, bf16):
    params = load_params(None, tiny_overrides(tiny_data) + ["device.name=cuda", f"device.bf16={bf16}",
                                                            "evaluate.autoattack_images=16"])
    lines = []
    summary = train(params, tmp_path / "run", log=lines.append)
    assert summary["train_loss"] == summary["train_loss"]   # finite, not NaN
    # 7 full batches and a smaller last one per epoch: the step was captured and replayed
    assert any("captured as a CUDA graph" in line for line in lines), lines
    metrics = evaluate(params, tmp_path / "run" / "checkpoint.pt", tmp_path / "run" / "eval.json", log=lambda m: None)
    assert metrics["device"].startswith("cuda") and metrics["latency_ms"] > 0
    assert metrics["pgd_acc"] <= metrics["clean_acc"]
    # the checkpoint written on the GPU loads on the CPU and gives (nearly) the same logits
    gpu_model, _ = load_model(tmp_path / "run" / "checkpoint.pt", setup(params.device))
    cpu_model, _ = load_model(tmp_path / "run" / "checkpoint.pt",
                              setup(dataclasses.replace(params.device, name="cpu", bf16=False)))
    x = torch.rand(8, 3, 32, 32)
    # cuDNN convolutions default to TF32 (10-bit mantissa): compare in full fp32
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        assert torch.allclose(gpu_model(x.cuda()).cpu(), cpu_model(x), atol=1e-3, rtol=1e-3)


def test_attack_on_cuda_restores_state_and_respects_the_ball():
    model = build_model("vgg11_w8", 10, 32).cuda().train()
    x, y = torch.rand(16, 3, 32, 32, device="cuda"), torch.arange(16, device="cuda") % 10
    x_adv = attacks.pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=5)
    assert model.training and all(p.grad is None and p.requires_grad for p in model.parameters())
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6


def _train_steps(model, runtime, method, eps, batches, warmup):
    """SGD steps through GradientStep; the loss of each step and the final state."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    step = GradientStep(model, OBJECTIVES[method], Adversary(eps=eps, step_size=eps / 4, steps=3), 6.0, runtime,
                        log=lambda m: None, warmup=warmup)
    losses = []
    for i, (x, y) in enumerate(batches):
        torch.manual_seed(i)          # the attack's random start: the same draws eagerly and replayed
        loss, _ = step(x, y)
        losses.append(float(loss))
        optimizer.step()
    return losses, model.state_dict(), step


@pytest.mark.parametrize("arch,method,eps", [
    (arch, method, eps) for arch in ("vgg11_w8", "resnet18_w8")
    for method, eps in (("pgd_at", 0.0), ("pgd_at", 8 / 255), ("trades", 8 / 255))
] + [("mobilevit_xxs", "pgd_at", 0.0), ("mobilevit_xxs", "trades", 0.0)])
def test_graphed_training_step_equals_the_eager_one(arch, method, eps):
    """Same init, data and seeds: replaying the captured step gives the eager losses and weights,
    across the warm-up, the capture, replays and a smaller last batch (eager, same .grad).

    eps > 0 also checks that replays draw the eager random starts; MobileViT only at eps 0,
    where no PGD sign can flip on the last bit of an attention kernel's non-deterministic sum."""
    torch.manual_seed(0)
    model = build_model(arch, 10, 32).cuda().to(memory_format=torch.channels_last).train()
    batches = [(torch.rand(16, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last),
                torch.randint(0, 10, (16,), device="cuda")) for _ in range(5)]
    batches.append((batches[0][0][:8], batches[0][1][:8]))
    batches.append(batches[1])
    results = {}
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        for graphs in (False, True):
            runtime = setup(DeviceParams(name="cuda", channels_last=True, bf16=False, cuda_graphs=graphs))
            torch.backends.cudnn.benchmark = False     # setup turns autotuning on; keep kernels comparable
            results[graphs] = _train_steps(copy.deepcopy(model), runtime, method, eps, batches, warmup=1)
    (eager_losses, eager_state, _), (graph_losses, graph_state, step) = results[False], results[True]
    assert step.graph is not None, "the step was not captured"
    assert graph_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)
    for name, tensor in eager_state.items():
        assert torch.allclose(graph_state[name].float(), tensor.float(), rtol=1e-3, atol=1e-5), name


def test_graphed_bf16_step_follows_the_eager_one():
    """bf16 autocast inside the capture (its cast cache off) gives the eager bf16 losses, up to bf16 rounding."""
    torch.manual_seed(0)
    model = build_model("resnet18_w8", 10, 32).cuda().to(memory_format=torch.channels_last).train()
    batches = [(torch.rand(32, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last),
                torch.randint(0, 10, (32,), device="cuda")) for _ in range(3)] * 3
    runs = {}
    for graphs in (False, True):
        runtime = setup(DeviceParams(name="cuda", channels_last=True, bf16=True, cuda_graphs=graphs))
        runs[graphs], _, step = _train_steps(copy.deepcopy(model), runtime, "pgd_at", 8 / 255, batches, warmup=2)
    assert step.graph is not None
    assert all(loss == loss and abs(loss) < 1e3 for loss in runs[True])
    assert runs[True] == pytest.approx(runs[False], abs=0.1)


def test_a_step_that_cannot_be_captured_trains_eagerly():
    """An objective that syncs with the host (.item()) cannot be captured: one line says so, training goes on."""
    def syncing(model, x, y, adversary, beta):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if float(loss) < 0:      # a host sync, which CUDA graph capture forbids
            raise AssertionError
        return loss, logits

    torch.manual_seed(0)
    model = build_model("vgg11_w8", 10, 32).cuda().train()
    runtime = setup(DeviceParams(name="cuda", channels_last=False, bf16=False, cuda_graphs=True))
    lines = []
    step = GradientStep(model, syncing, Adversary(eps=0.0, step_size=0.0, steps=0), 0.0, runtime, lines.append,
                        warmup=1)
    x, y = torch.rand(16, 3, 32, 32, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    for _ in range(3):
        loss, _ = step(x, y)
        assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
    assert step.graph is None and not step.use_graph
    assert len(lines) == 1 and "training eagerly" in lines[0]
