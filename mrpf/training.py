"""Adversarial training (``mrpf train``): SGD with momentum, lr schedules, per-epoch metrics, resume.

The objective is chosen by name (``train.method``, see :mod:`mrpf.objectives`). Each epoch
seeds its own shuffling, augmentation and attack randomness from ``(seed, epoch)``, so a
run resumed from its last completed epoch ends with the same weights as one that never
stopped (CPU). Per-epoch metrics go to ``<run>/history.csv`` (``dvc plots`` draws them).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from . import data as data_mod
from . import devices, stopping
from .config import Params, TrainParams
from .errors import MrpfError
from .gradient_step import GradientStep
from .io import atomic_path, crash_point, load_checkpoint, remove_stale_temporaries, save_checkpoint, write_json
from .models import arch_description, instantiate
from .objectives import Adversary, objective_for, training_adversary, validation_adversary

RESUME_FILE = "last.pt"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "train_metrics.json"


def make_optimizer(model: torch.nn.Module, train: TrainParams, device: torch.device) -> torch.optim.Optimizer:
    """SGD with (Nesterov) momentum; weight decay on conv/linear weights only, not on BN or biases."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused CUDA kernel for the update (one launch for all parameters); on the CPU the step is
    # a negligible share of a PGD-k batch, so the default implementation stays.
    kwargs = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum,
                           nesterov=train.nesterov and train.momentum > 0,
                           **kwargs)


def make_scheduler(optimizer: torch.optim.Optimizer, train: TrainParams, steps_per_epoch: int):
    """A per-batch learning-rate schedule from torch.optim.lr_scheduler."""
    total = max(1, train.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler
    name = train.schedule
    if name == "onecycle":
        return sched.OneCycleLR(optimizer, max_lr=train.lr, total_steps=total,
                                pct_start=0.3, cycle_momentum=False, anneal_strategy="linear")
    if name == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=total)
    if name == "multistep":
        milestones = [int(round(m * total)) for m in train.milestones]
        return sched.MultiStepLR(optimizer, milestones=milestones, gamma=train.gamma)
    return sched.LambdaLR(optimizer, lambda step: 1.0)


def make_ema(model: torch.nn.Module, decay):
    """Exponential moving average of weights and BN statistics (torch.optim.swa_utils), or None.

    Weight averaging raises robust accuracy in adversarial training at no compute cost
    (Gowal et al., 2020; Rebuffi et al., 2021). The average, not the raw model, is validated
    and saved.
    """
    if decay is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(float(decay)), use_buffers=True)


def _resume_key(params: Params, arch: dict) -> str:
    """The params that define a training run; a resume with different ones is refused."""
    plain = params.to_dict()
    return json.dumps({"arch": arch, **{k: plain[k] for k in ("seed", "data", "attack", "train")}}, sort_keys=True)


def evaluate_split(model: torch.nn.Module, images: data_mod.ImageSet, runtime: devices.Runtime,
                   adversary: Adversary | None, batch_size: int = 500) -> float:
    """Accuracy on ``images``, clean (adversary None) or under PGD (fp32, eval mode)."""
    if len(images) == 0:
        return float("nan")
    correct = 0
    was_training = model.training
    model.eval()
    for x, y in data_mod.Batches(images, batch_size, runtime.device, channels_last=runtime.channels_last):
        if adversary is not None:
            x = adversary.attack(model, x, y)
        with torch.no_grad():
            correct += int((model(x).argmax(1) == y).sum())
    model.train(was_training)
    return correct / len(images)


def train_batches(model: torch.nn.Module, params: Params, batches: list[tuple[torch.Tensor, torch.Tensor]],
                  runtime: devices.Runtime, teacher: torch.nn.Module | None = None, seed: int = 0) -> None:
    """SGD on ``batches`` with ``params.train``'s objective and optimizer at its constant lr, in
    place: a few steps of the training loop above, without schedule, validation or checkpoint.
    ``seed`` fixes the attack starts; the model is left in eval mode."""
    tp = params.train
    objective = objective_for(tp.method, teacher)
    optimizer = make_optimizer(model, tp, runtime.device)
    gradients = GradientStep(model, objective, training_adversary(params), tp.beta, runtime)
    torch.manual_seed(seed)
    model.train()
    for x, y in batches:
        gradients(x, y)
        optimizer.step()
    for p in model.parameters():
        p.grad = None
    model.eval()


class _Progress:
    """A tqdm bar within the epoch on a terminal; nothing otherwise (the epoch line is always printed)."""

    def __init__(self, total: int, desc: str):
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, loss: float, acc: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


HISTORY_FILE = "history.csv"
HISTORY_COLUMNS = ("epoch", "train_loss", "train_robust_acc", "train_clean_acc", "val_clean_acc", "val_pgd_acc",
                   "lr", "images_per_s", "epoch_seconds")


def write_history(path: Path, history: list[dict]) -> None:
    """Per-epoch metrics as CSV (``dvc plots show`` draws it, x = epoch), rewritten atomically.

    Not dvclive: dvclive.Live initialises a DVC repository in any Git checkout it runs in,
    fails in a Git repository without commits, and appends to its files in place, so a
    killed run can leave a torn or duplicated row. This file is rebuilt from the resume
    state after each epoch instead, so it always matches the last completed epoch.
    """
    rows = [",".join(HISTORY_COLUMNS)]
    for row in history:
        rows.append(",".join("" if row.get(c) is None else f"{row[c]:.6g}" if isinstance(row[c], float)
                             else str(row[c]) for c in HISTORY_COLUMNS))
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(rows) + "\n")


def _save_stop(resume_path: Path, arch: dict, model, optimizer, ema, scheduler, epoch: int, batch: int,
               history: list, params: Params, loss_sum, correct, seen: int, seconds: float, runtime) -> None:
    """The resume point at a batch boundary inside ``epoch`` (SIGTERM): what the epoch's end
    saves, plus the batches done, their running sums and the attack RNG's state."""
    extra = {"cuda_rng": torch.cuda.get_rng_state(runtime.device)} if runtime.device.type == "cuda" else {}
    save_checkpoint(resume_path, arch, model.state_dict(), optimizer=optimizer.state_dict(),
                    **({} if ema is None else {"ema": ema.state_dict()}), scheduler=scheduler.state_dict(),
                    epoch=epoch - 1, history=history, resume_key=_resume_key(params, arch),
                    in_progress={"batch": batch + 1, "seen": seen, "seconds": seconds},
                    loss_sum=loss_sum.detach().cpu(), correct=correct.detach().cpu(), rng=torch.get_rng_state(),
                    **extra)


def train(params: Params, run_dir: str | Path, log=print, *, model: torch.nn.Module | None = None,
          arch: dict | None = None, teacher: torch.nn.Module | None = None) -> dict:
    """Train a model as ``params`` say; write ``checkpoint.pt`` and ``train_metrics.json`` to ``run_dir``.

    With ``model`` and ``arch`` (a pruned model being fine-tuned), train that model instead of
    a freshly initialised one; on return it holds the weights that were validated and saved
    (with ``train.ema_decay``, the EMA), so pruning goes on from the checkpoint's model.
    ``teacher``: the dense model a distillation objective (``rslad``) learns from.
    """
    run_dir = Path(run_dir)
    runtime = devices.setup(params.device, log)
    tp = params.train
    objective = objective_for(tp.method, None if teacher is None else runtime.prepare(teacher))
    adversary = training_adversary(params)
    val_adversary = validation_adversary(params)
    splits = data_mod.load_splits(params.data, with_test=False)
    spec = splits.spec
    if model is None:
        arch = arch_description(params.model.arch, spec.num_classes, spec.input_size, spec.mean, spec.std,
                                params.model.activation)
        torch.manual_seed(params.seed)
        model = instantiate(arch)
    model = runtime.prepare(model)
    steps_per_epoch = math.ceil(len(splits.train) / tp.batch_size)
    optimizer = make_optimizer(model, tp, runtime.device)
    scheduler = make_scheduler(optimizer, tp, steps_per_epoch)
    ema = make_ema(model, tp.ema_decay)
    eval_model = model if ema is None else ema.module   # validated and saved

    start_epoch, history, in_progress = 0, [], None
    remove_stale_temporaries(run_dir)
    resume_path = run_dir / RESUME_FILE
    if resume_path.is_file():
        state = load_checkpoint(resume_path)
        if state.get("resume_key") != _resume_key(params, arch):
            raise MrpfError(f"{resume_path} belongs to a run with different parameters; "
                            f"delete it or choose another run name")
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        in_progress = state.get("in_progress")    # stopped by SIGTERM inside epoch start_epoch + 1
        if in_progress is None:
            log(f"resuming {run_dir.name} after epoch {start_epoch}/{tp.epochs}")
        else:
            log(f"resuming {run_dir.name} in epoch {start_epoch + 1}/{tp.epochs} after batch {in_progress['batch']}")

    run_dir.mkdir(parents=True, exist_ok=True)
    train_images = data_mod.Batches(splits.train, tp.batch_size, runtime.device, shuffle=True,
                                    spec=spec if params.data.augment else None,
                                    channels_last=runtime.channels_last)
    # objective and backward of each batch; on CUDA replayed from a CUDA graph (device.cuda_graphs)
    gradients = GradientStep(model, objective, adversary, tp.beta, runtime, log)
    with stopping.deferred():   # SIGTERM: stop at the next batch boundary, resumable there
        for epoch in range(start_epoch, tp.epochs):
            torch.manual_seed(params.seed * 100_003 + epoch)      # attack random starts of this epoch
            train_images.seed = params.seed * 1_000_003 + epoch     # shuffling and augmentation of this epoch
            model.train()
            started = time.perf_counter()
            loss_sum = torch.zeros((), device=runtime.device)
            correct = torch.zeros((), device=runtime.device, dtype=torch.long)
            seen, skip, earlier = 0, 0, 0.0
            if in_progress is not None:   # the batches before the stop are done: their sums, the attack RNG after them
                skip, seen, earlier = in_progress["batch"], in_progress["seen"], in_progress["seconds"]
                loss_sum += state["loss_sum"].to(runtime.device)
                correct += state["correct"].to(runtime.device)
                torch.set_rng_state(state["rng"])
                if "cuda_rng" in state:
                    torch.cuda.set_rng_state(state["cuda_rng"], runtime.device)
                in_progress = None
            progress = _Progress(len(train_images), f"epoch {epoch + 1}/{tp.epochs}")
            for batch, (x, y) in enumerate(train_images):
                if batch < skip:      # the iterator still draws their shuffling and augmentation
                    continue
                crash_point("batch")
                loss, logits = gradients(x, y)
                if not torch.isfinite(loss):
                    progress.close()
                    raise MrpfError(f"training diverged: loss is {loss.item()} at epoch {epoch + 1}, batch {batch + 1} "
                                    f"(lower train.lr?); no checkpoint of this epoch was written")
                optimizer.step()
                if ema is not None:
                    ema.update_parameters(model)
                lr = optimizer.param_groups[0]["lr"]   # the rate this batch used
                scheduler.step()
                loss_sum += loss.detach() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(y)
                if progress.bar is not None:  # .item() syncs a GPU: only when a bar is drawn
                    progress.update(loss.item(), int(correct) / seen)
                if stopping.requested():
                    progress.close()
                    _save_stop(resume_path, arch, model, optimizer, ema, scheduler, epoch, batch, history, params,
                               loss_sum, correct, seen, earlier + time.perf_counter() - started, runtime)
                    raise stopping.Stopped(f"stopped by SIGTERM in epoch {epoch + 1}/{tp.epochs} after batch "
                                           f"{batch + 1}; the same command resumes there ({resume_path})")
            progress.close()
            seconds = earlier + time.perf_counter() - started
            row = {"epoch": epoch, "train_loss": float(loss_sum) / seen,
                   ("train_clean_acc" if tp.method == "clean" else "train_robust_acc"): int(correct) / seen,
                   "lr": lr, "images_per_s": seen / seconds, "epoch_seconds": seconds,
                   "val_clean_acc": evaluate_split(eval_model, splits.val, runtime, None),
                   "val_pgd_acc": evaluate_split(eval_model, splits.val, runtime, val_adversary)
                   if tp.val_pgd_steps else None}
            history.append(row)
            save_checkpoint(resume_path, arch, model.state_dict(), optimizer=optimizer.state_dict(),
                            **({} if ema is None else {"ema": ema.state_dict()}),
                            scheduler=scheduler.state_dict(), epoch=epoch, history=history,
                            resume_key=_resume_key(params, arch))
            write_history(run_dir / HISTORY_FILE, history)
            val_pgd = "-" if row["val_pgd_acc"] is None else f"{row['val_pgd_acc']:.3f}"
            log(f"epoch {epoch + 1}/{tp.epochs}  loss {row['train_loss']:.4f}  "
                f"train_acc {int(correct) / seen:.3f}  val_clean {row['val_clean_acc']:.3f}  val_pgd {val_pgd}  "
                f"{row['images_per_s']:.0f} img/s  {seconds:.1f}s")

    write_history(run_dir / HISTORY_FILE, history)    # again: a kill may have come between last.pt and it
    summary = {"epochs": tp.epochs, "method": tp.method, "arch": arch["name"],
               "train_seconds": sum(r["epoch_seconds"] for r in history),
               **({k: v for k, v in history[-1].items() if k != "epoch"} if history else {})}
    save_checkpoint(run_dir / CHECKPOINT_FILE, arch, eval_model.state_dict(), epoch=tp.epochs, params=params.to_dict())
    write_json(run_dir / METRICS_FILE, summary)
    resume_path.unlink(missing_ok=True)
    if ema is not None:   # the caller's model (a pruned model being fine-tuned) goes on as the one saved
        model.load_state_dict(ema.module.state_dict())
    return summary
