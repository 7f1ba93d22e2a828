"""Benchmarks a and b of docs/performance.md.

a. Adversarial-training throughput (images/s) of `mrpf`'s training loop (mrpf.training.train:
   data held on the device, augmentation there, channels_last, bf16 on CUDA) for PGD-AT and
   TRADES, against a reference loop written the way the public TRADES and HYDRA training
   scripts are (fp32, NCHW, torchvision DataLoader with PIL transforms, model.eval() for the
   attack), with the same model, initial weights, k, batch size, optimiser and lr schedule.
   With ``--accuracy`` both loops train for the same epochs and are then evaluated on the
   test images (clean and PGD-20, fp32), with the paired 95 % interval of the difference:
   "faster at equal robust accuracy".
b. Step efficiency: time of one PGD-k training step / ((k + 1) x time of one clean
   forward-backward step), 1.0 being the limit.

    python -m bench.throughput [--device cpu|cuda] [--arch vgg11_w8] [--steps 5] [--images 2560]
    python -m bench.throughput --device cuda --arch resnet18 --steps 10 --images 10000 \
        --accuracy --epochs 10 --budget-s 240     # the GPU check
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import SHARED, timed, write
from mrpf.attacks import pgd
from mrpf.config import DeviceParams, Params, load_params
from mrpf.data import read_npz, spec_for
from mrpf.devices import setup
from mrpf.evaluation import correct_under, load_model
from mrpf.models import arch_description, build_model, instantiate
from mrpf.statistics import paired_difference
from mrpf.training import CHECKPOINT_FILE, HISTORY_FILE, make_optimizer, make_scheduler, train

EPS = 8 / 255


def subset_npz(n: int, folder: Path, split: str = "train") -> Path:
    """The first n images of the real CIFAR-10 subset, or generated ones where it is absent."""
    path = folder / f"bench-{split}.npz"
    source = SHARED / f"cifar10-subset-{split}.npz"
    if source.is_file():
        with np.load(source) as f:
            order = np.arange(len(f["y"])) if split == "train" else np.random.default_rng(0).permutation(len(f["y"]))
            np.savez(path, x=f["x"][order[:n]], y=f["y"][order[:n]])
    else:
        rng = np.random.default_rng(0 if split == "train" else 1)
        np.savez(path, x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 10, n))
    return path


def bench_params(npz: Path, method: str, arch: str, steps: int, batch: int, device: str, bf16: bool,
                 epochs: int, cuda_graphs: bool = True) -> dict:
    """mrpf's parameters for the run; the reference loop reads its recipe from them too."""
    return load_params(None, [f"data.train_path={npz}", "data.val_size=64", "data.calibration_size=0",
                              f"model.arch={arch}", f"train.method={method}", f"train.epochs={epochs}",
                              f"train.steps={steps}", f"train.batch_size={batch}", "train.val_pgd_steps=0",
                              f"device.name={device}", f"device.bf16={str(bf16).lower()}",
                              f"device.cuda_graphs={str(cuda_graphs).lower()}"])


def params_of(args, npz: Path, method: str, bf16: bool, epochs: int) -> dict:
    return bench_params(npz, method, args.arch, args.steps, args.batch, args.device, bf16, epochs,
                        args.cuda_graphs == "on")


def mrpf_train(params: Params, folder: Path) -> tuple[Path, list[float]]:
    """mrpf's own loop; returns its checkpoint and the images/s of each epoch."""
    train(params, folder, log=lambda m: None)
    lines = (folder / HISTORY_FILE).read_text().splitlines()
    column = lines[0].split(",").index("images_per_s")
    return folder / CHECKPOINT_FILE, [float(line.split(",")[column]) for line in lines[1:]]


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


def reference_model(params: Params) -> torch.nn.Module:
    """The same initial weights mrpf's train() starts from (same seed, same description)."""
    spec = spec_for(params.data)
    torch.manual_seed(params.seed)
    return instantiate(arch_description(params.model.arch, spec.num_classes, spec.input_size, spec.mean,
                                        spec.std, params.model.activation))


def reference_train(params: Params, npz: Path, max_batches: int | None = None) -> tuple[torch.nn.Module, list[float]]:
    """The reference loop (TRADES repo's train_trades_cifar10.py / HYDRA's adversarial training):
    fp32, NCHW, DataLoader + PIL, the attack in eval mode. Returns the model and images/s per epoch."""
    tp = params.train
    method, steps, batch, beta = tp.method, tp.steps, tp.batch_size, tp.beta
    step_size = 2.5 * EPS / steps
    device = params.device.name
    dev = torch.device(device)
    # cuDNN autotuning for the reference too (mrpf turns it on), so the ratio credits only the
    # changes mrpf makes to the loop itself
    torch.backends.cudnn.benchmark = device == "cuda"
    model = reference_model(params).to(dev)
    loader = torch.utils.data.DataLoader(PilDataset(npz), batch_size=batch, shuffle=True, num_workers=1,
                                         pin_memory=device == "cuda", drop_last=True)
    # the same recipe as mrpf's (optimiser, weight-decay groups, schedule) in its plain,
    # non-fused implementation (make_optimizer fuses only on CUDA devices)
    optimizer = make_optimizer(model, tp, torch.device("cpu"))
    scheduler = make_scheduler(optimizer, tp, len(loader))
    rates = []
    for _ in range(tp.epochs):
        seen, start = 0, time.perf_counter()
        for x, y in loader:
            x, y = x.to(dev), y.to(dev)
            model.eval()
            if method == "trades":
                p_clean = F.softmax(model(x), 1).detach()
                x_adv = x.detach() + 0.001 * torch.randn_like(x)
            else:
                x_adv = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
            for _ in range(steps):
                x_adv.requires_grad_(True)
                with torch.enable_grad():
                    out = model(x_adv)
                    loss = (F.kl_div(F.log_softmax(out, 1), p_clean, reduction="sum") if method == "trades"
                            else F.cross_entropy(out, y))
                grad = torch.autograd.grad(loss, [x_adv])[0]
                x_adv = torch.min(torch.max(x_adv.detach() + step_size * grad.sign(), x - EPS), x + EPS).clamp(0, 1)
            model.train()
            optimizer.zero_grad()
            if method == "trades":
                logits = model(x)
                loss = F.cross_entropy(logits, y) + beta * F.kl_div(F.log_softmax(model(x_adv), 1),
                                                                     F.softmax(logits, 1), reduction="batchmean")
            else:
                loss = F.cross_entropy(model(x_adv), y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(y)
            if max_batches is not None and seen >= max_batches * batch:
                break
        if device == "cuda":
            torch.cuda.synchronize()
        rates.append(seen / (time.perf_counter() - start))
    return model, rates


def steady_rate(rates: list[float]) -> float:
    """Images/s of a run: the median over epochs after the first (warm-up), or the one epoch."""
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def test_outcomes(model: torch.nn.Module, test_npz: Path, device: str) -> dict:
    """Per test image, right or wrong: clean and under PGD-20 (eps 8/255, step 2/255), fp32."""
    runtime = setup(DeviceParams(name=device, channels_last=True, bf16=False))
    model = runtime.prepare(model).eval()
    images = read_npz(test_npz)

    def attack(x, y):
        return pgd(model, x, y, eps=EPS, step_size=2 / 255, steps=20)

    return {name: correct_under(model, images, a, runtime, 500).numpy()
            for name, a in (("clean", None), ("pgd20", attack))}


def affordable_epochs(params: Params, npz: Path, budget_s: float, wanted: int) -> int:
    """Epochs that fit both loops in budget_s, from a short probe of the reference loop
    (the slower of the two everywhere measured so far)."""
    probe = params.replace("train", epochs=1)
    reference_train(probe, npz, max_batches=3)                      # warm-up (cuDNN autotuning, workers)
    _, rate = reference_train(probe, npz, max_batches=10)
    epoch_s = len(PilDataset(npz)) / rate[0]
    return max(1, min(wanted, math.floor(budget_s / (2 * epoch_s))))


def accuracy_run(args, npz: Path, test_npz: Path, method: str, bf16: bool, folder: Path) -> dict:
    """Both loops for the same epochs, then the same evaluation of both models."""
    params = params_of(args, npz, method, bf16, args.epochs)
    epochs = affordable_epochs(params, npz, args.budget_s, args.epochs) if args.budget_s else args.epochs
    params = params_of(args, npz, method, bf16, epochs)
    ref_model, ref_rates = reference_train(params, npz)
    checkpoint, our_rates = mrpf_train(params, folder / method)
    our_model, _ = load_model(checkpoint, setup(params.device))
    ref, ours = test_outcomes(ref_model, test_npz, args.device), test_outcomes(our_model, test_npz, args.device)
    accuracy = {name: {"mrpf": float(ours[name].mean()), "reference": float(ref[name].mean()),
                       "mrpf_minus_reference": paired_difference(ours[name], ref[name])} for name in ours}
    return {"epochs": epochs, "mrpf_images_per_s": steady_rate(our_rates),
            "reference_images_per_s": steady_rate(ref_rates),
            "ratio": steady_rate(our_rates) / steady_rate(ref_rates),
            "epochs_images_per_s": {"mrpf": our_rates, "reference": ref_rates}, "test_accuracy": accuracy}


def throughput_run(args, npz: Path, method: str, bf16: bool, folder: Path) -> dict:
    """One epoch of each loop, interleaved over rounds so drift in machine speed hits both."""
    params = params_of(args, npz, method, bf16, 1)
    ours, ref = [], []
    for i in range(args.warmup_rounds + args.rounds):
        r, o = reference_train(params, npz)[1], mrpf_train(params, folder / f"{method}-{i}")[1]
        if i >= args.warmup_rounds:    # warm-up rounds: cuDNN autotuning, allocator, first-call costs
            ref, ours = ref + r, ours + o
    return {"mrpf_images_per_s": float(np.median(ours)), "reference_images_per_s": float(np.median(ref)),
            "ratio": float(np.median(ours) / np.median(ref)), "rounds": {"mrpf": ours, "reference": ref}}


def training_step(model, runtime, method: str, batch: int, steps: int):
    """One training step of ``method`` (objective, then backward) on a fixed random batch, as a callable."""
    from mrpf.objectives import OBJECTIVES, Adversary

    x = torch.rand(batch, 3, 32, 32, device=runtime.device).contiguous(memory_format=runtime.memory_format)
    y = torch.randint(0, 10, (batch,), device=runtime.device)
    adversary = Adversary(eps=EPS, step_size=2.5 * EPS / steps, steps=steps)

    def run():
        with runtime.autocast():
            loss, _ = OBJECTIVES[method](model, x, y, adversary, 6.0)
        model.zero_grad(set_to_none=True)
        loss.backward()
    return run


def step_efficiency(arch: str, steps: int, batch: int, device: str, bf16: bool, repeats: int = 5,
                    rounds: int = 4) -> dict:
    """b: one PGD-k training step vs (k+1) clean forward-backward steps, in mrpf's own setting.
    Interleaved rounds, medians: single timings of the same step varied 119-191 ms on the CPU."""
    runtime = setup(DeviceParams(name=device, channels_last=True, bf16=bf16))
    model = runtime.prepare(build_model(arch, 10, 32)).train()
    clean_step, pgd_step = (training_step(model, runtime, m, batch, steps) for m in ("clean", "pgd_at"))
    timed(clean_step, 3, device)   # warm-up
    timed(pgd_step, 3, device)
    clean, pgd = [], []
    for _ in range(rounds):
        clean.append(timed(clean_step, repeats * 2, device))
        pgd.append(timed(pgd_step, repeats, device))
    clean, pgd = statistics.median(clean), statistics.median(pgd)
    return {"clean_step_ms": 1000 * clean, "pgd_step_ms": 1000 * pgd, "k": steps,
            "step_efficiency": (steps + 1) * clean / pgd}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", default="vgg11_w8")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--images", type=int, default=2560)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the median is reported")
    p.add_argument("--warmup-rounds", type=int, default=0,
                   help="interleaved rounds run first and discarded (on a GPU: cuDNN autotuning)")
    p.add_argument("--bf16", choices=["on", "off"], default=None,
                   help="mrpf's bf16 autocast (default: on for CUDA, off for CPU); the reference stays fp32")
    p.add_argument("--cuda-graphs", choices=["on", "off"], default="on",
                   help="mrpf's device.cuda_graphs (CUDA only): replay each training step from a CUDA graph")
    p.add_argument("--methods", nargs="+", default=["pgd_at", "trades"], choices=["pgd_at", "trades"])
    p.add_argument("--accuracy", action="store_true",
                   help="train both loops for --epochs, then compare test accuracy (clean, PGD-20)")
    p.add_argument("--epochs", type=int, default=10, help="with --accuracy: epochs of each loop")
    p.add_argument("--test-images", type=int, default=2000, help="with --accuracy: test images")
    p.add_argument("--budget-s", type=float, default=None,
                   help="with --accuracy: fewer epochs where both loops would not fit this many seconds")
    p.add_argument("--name", default=None, help="results file name (default: throughput-DEVICE[-bf16|-accuracy])")
    args = p.parse_args()
    bf16 = (args.bf16 or ("on" if args.device == "cuda" else "off")) == "on"
    result = {"arch": args.arch, "k": args.steps, "batch": args.batch, "images": args.images,
              "device": args.device, "mrpf_bf16": bf16,
              "mrpf_cuda_graphs": args.device.startswith("cuda") and args.cuda_graphs == "on"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        npz = subset_npz(args.images, folder)
        for method in args.methods:
            if args.accuracy:
                test_npz = subset_npz(args.test_images, folder, "test")
                result[method] = accuracy_run(args, npz, test_npz, method, bf16, folder)
            else:
                result[method] = throughput_run(args, npz, method, bf16, folder)
            print(f"{method}: mrpf {result[method]['mrpf_images_per_s']:.0f} img/s, reference "
                  f"{result[method]['reference_images_per_s']:.0f} img/s = {result[method]['ratio']:.2f}x", flush=True)
    result["step"] = step_efficiency(args.arch, args.steps, args.batch, args.device, bf16)
    suffix = "-accuracy" if args.accuracy else "-bf16" if bf16 and args.device == "cpu" else ""
    write(args.name or f"throughput-{args.device}{suffix}", result)


if __name__ == "__main__":
    main()
