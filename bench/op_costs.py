"""The single-op costs behind two changes (docs/performance.md, CPU section):

- Gaussian noise for a channels_last batch: ``randn_like`` directly vs drawn in NCHW order and
  then laid out (mrpf.attacks._gaussian_like), 128 x 3 x 32 x 32;
- train-mode BatchNorm forward + backward in NCHW vs channels_last, 128 x 64 x 32 x 32;
- one TRADES training step of mrpf (VGG-11÷8, PGD-5, batch 128, channels_last, fp32) and the
  share its costliest ops take (torch.profiler).

    python -m bench.op_costs          -> bench/results/op-costs.json
"""

from __future__ import annotations

import torch

from bench.common import timed, write
from bench.throughput import training_step
from mrpf.attacks import _gaussian_like
from mrpf.config import DeviceParams
from mrpf.devices import setup
from mrpf.models import build_model


def ms(fn, repeats: int = 10) -> float:
    fn()                                  # warm-up
    return 1000 * timed(fn, repeats)


def batch_norm_ms(layout: torch.memory_format) -> float:
    bn = torch.nn.BatchNorm2d(64).train()
    a = torch.rand(128, 64, 32, 32).contiguous(memory_format=layout).requires_grad_(True)
    return ms(lambda: bn(a).sum().backward())


def trades_profile() -> dict:
    from torch.profiler import ProfilerActivity, profile

    runtime = setup(DeviceParams(name="cpu", channels_last=True, bf16=False))
    model = runtime.prepare(build_model("vgg11_w8", 10, 32)).train()
    step = training_step(model, runtime, "trades", 128, 5)
    step_ms = ms(step, 5)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    return {"step_ms": step_ms, "top_ops": [{"op": e.key, "self_cpu_ms_per_step": e.self_cpu_time_total / 3000,
                                              "calls_per_step": e.count / 3} for e in top]}


def main() -> None:
    x = torch.rand(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    result = {"randn_like_channels_last_ms": ms(lambda: torch.randn_like(x)),
              "gaussian_like_channels_last_ms": ms(lambda: _gaussian_like(x)),
              "batch_norm_train_fwd_bwd_nchw_ms": batch_norm_ms(torch.contiguous_format),
              "batch_norm_train_fwd_bwd_channels_last_ms": batch_norm_ms(torch.channels_last),
              "trades_step": trades_profile()}
    write("op-costs", result)


if __name__ == "__main__":
    main()
