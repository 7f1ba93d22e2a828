"""Benchmarks a and b of docs/performance.md.

a. Adversarial-training throughput (images/s) of `mrpf`'s training loop (mrpf.training.train:
   data held on the device, augmentation there, channels_last, bf16 on CUDA) for PGD-AT and
   TRADES, against a reference loop written the way the public TRADES and HYDRA training
   scripts are (fp32, NCHW, torchvision DataLoader with PIL transforms, model.eval() for the
   attack), with the same model, k and batch size; interleaved in one run.
b. Step efficiency: time of one PGD-k training step / ((k + 1) x time of one clean
   forward-backward step), 1.0 being the limit.

    python bench/throughput.py [--device cpu|cuda] [--arch vgg11_w8] [--steps 5] [--images 2560]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, timed, write  # noqa: E402

from mrpf.config import load_params  # noqa: E402
from mrpf.models import build_model  # noqa: E402
from mrpf.training import train  # noqa: E402


def subset_npz(n: int, folder: Path) -> Path:
    """The first n images of the real CIFAR-10 subset, or generated ones where it is absent."""
    path = folder / "bench-train.npz"
    source = SHARED / "cifar10-subset-train.npz"
    if source.is_file():
        with np.load(source) as f:
            np.savez(path, x=f["x"][:n], y=f["y"][:n])
    else:
        rng = np.random.default_rng(0)
        np.savez(path, x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 10, n))
    return path


def mrpf_throughput(npz: Path, method: str, arch: str, steps: int, batch: int, device: str, bf16: bool) -> float:
    params = load_params(None, [f"data.train_path={npz}", "data.val_size=64", "data.calibration_size=0",
                                f"model.arch={arch}", f"train.method={method}", "train.epochs=1",
                                f"train.steps={steps}", f"train.batch_size={batch}", "train.val_pgd_steps=0",
                                f"device.name={device}", f"device.bf16={'true' if bf16 else 'false'}"])
    with tempfile.TemporaryDirectory() as out:
        summary = train(params, out, log=lambda m: None)
    return summary["images_per_s"]


class PilDataset(torch.utils.data.Dataset):
    """Images as PIL objects through torchvision transforms, as torchvision.datasets.CIFAR10 serves them."""

    def __init__(self, npz: Path):
        import torchvision.transforms as T

        with np.load(npz) as f:
            self.x, self.y = f["x"], f["y"]
        self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def reference_throughput(npz: Path, method: str, arch: str, steps: int, batch: int, device: str) -> float:
    """One epoch of the reference loop (TRADES repo's train_trades_cifar10.py / HYDRA's adv training)."""
    eps, step_size, beta = 8 / 255, 2.5 * (8 / 255) / steps, 6.0
    dev = torch.device(device)
    model = build_model(arch, 10, 32).to(dev)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loader = torch.utils.data.DataLoader(PilDataset(npz), batch_size=batch, shuffle=True, num_workers=1,
                                         pin_memory=device == "cuda", drop_last=True)
    seen, start = 0, time.perf_counter()
    for x, y in loader:
        x, y = x.to(dev), y.to(dev)
        model.eval()
        if method == "trades":
            p_clean = F.softmax(model(x), 1).detach()
            x_adv = x.detach() + 0.001 * torch.randn_like(x)
        else:
            x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                out = model(x_adv)
                loss = (F.kl_div(F.log_softmax(out, 1), p_clean, reduction="sum") if method == "trades"
                        else F.cross_entropy(out, y))
            grad = torch.autograd.grad(loss, [x_adv])[0]
            x_adv = torch.min(torch.max(x_adv.detach() + step_size * grad.sign(), x - eps), x + eps).clamp(0, 1)
        model.train()
        optimizer.zero_grad()
        if method == "trades":
            logits = model(x)
            loss = F.cross_entropy(logits, y) + beta * F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(logits, 1),
                                                                 reduction="batchmean")
        else:
            loss = F.cross_entropy(model(x_adv), y)
        loss.backward()
        optimizer.step()
        seen += len(y)
    if device == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def step_efficiency(arch: str, steps: int, batch: int, device: str, repeats: int = 10) -> dict:
    """b: one PGD-k training step vs (k+1) clean forward-backward steps, in mrpf's own setting."""
    from mrpf.devices import setup
    from mrpf.objectives import OBJECTIVES, Adversary

    runtime = setup({"name": device, "threads": None, "channels_last": True, "bf16": device == "cuda"})
    model = runtime.prepare(build_model(arch, 10, 32)).train()
    x = torch.rand(batch, 3, 32, 32, device=runtime.device).contiguous(memory_format=runtime.memory_format)
    y = torch.randint(0, 10, (batch,), device=runtime.device)
    adversary = Adversary(eps=8 / 255, step_size=2.5 * (8 / 255) / steps, steps=steps)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step(method):
        def run():
            with runtime.autocast():
                loss, _ = OBJECTIVES[method](model, x, y, adversary, 6.0)
            model.zero_grad(set_to_none=True)
            loss.backward()
            sync()
        return run

    for method in ("clean", "pgd_at"):
        timed(step(method), 3)   # warm-up
    clean = timed(step("clean"), repeats * 2)
    pgd_step = timed(step("pgd_at"), repeats)
    return {"clean_step_ms": 1000 * clean, "pgd_step_ms": 1000 * pgd_step, "k": steps,
            "step_efficiency": (steps + 1) * clean / pgd_step}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", default="vgg11_w8")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--images", type=int, default=2560)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the median is reported")
    p.add_argument("--bf16", choices=["on", "off"], default=None,
                   help="mrpf's bf16 autocast (default: on for CUDA, off for CPU); the reference stays fp32")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        npz = subset_npz(args.images, Path(folder))
        bf16 = (args.bf16 or ("on" if args.device == "cuda" else "off")) == "on"
        result = {"arch": args.arch, "k": args.steps, "batch": args.batch, "images": args.images,
                  "device": args.device, "mrpf_bf16": bf16}
        for method in ("pgd_at", "trades"):
            ours, ref = [], []
            for _ in range(args.rounds):   # interleaved, so drift in machine speed hits both
                ref.append(reference_throughput(npz, method, args.arch, args.steps, args.batch, args.device))
                ours.append(mrpf_throughput(npz, method, args.arch, args.steps, args.batch, args.device, bf16))
            result[method] = {"mrpf_images_per_s": float(np.median(ours)), "reference_images_per_s": float(np.median(ref)),
                              "ratio": float(np.median(ours) / np.median(ref)), "rounds": {"mrpf": ours, "reference": ref}}
    result["step"] = step_efficiency(args.arch, args.steps, args.batch, args.device)
    write(f"throughput-{args.device}{'-bf16' if bf16 and args.device == 'cpu' else ''}", result)


if __name__ == "__main__":
    main()
