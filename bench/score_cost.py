"""Benchmark e of docs/performance.md: the scoring cost of the learned methods (HYDRA, HARP) as
a share of the dense model's training time, beside MRPF's MRS, on the evidence grid's model.

Measured in one run on one machine: one epoch of the dense recipe's training (``mrpf train``'s
loop, val PGD off), one epoch of HYDRA's and of HARP's score learning on the same training
images (the grid's fine-tuning objective against the masked model, weights frozen) and one MRS
measurement of every group. A prune run at the grid's settings costs ``prune.steps`` x
``prune.score_epochs`` score epochs; dense training costs ``train.epochs`` epochs.

    python -m bench.score_cost [--grid evidence --arch vgg11_w2 --train-method pgd_at]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import types
from pathlib import Path

from bench.common import ROOT, SHARED, write
from mrpf import data as data_mod
from mrpf import devices
from mrpf import groups as groups_mod
from mrpf.config import load_params
from mrpf.latency import budget_counts
from mrpf.models import load_model
from mrpf.pruning import learned_solver
from mrpf.sensitivity import run_mrs
from mrpf.training import train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default="evidence")
    p.add_argument("--arch", default="vgg11_w2", help="the grid's architecture (a grid axis, not a parameter)")
    p.add_argument("--train-method", default="pgd_at", help="the grid's dense training method (a grid axis)")
    p.add_argument("--checkpoint", default="experiments/evidence/results/cifar10/vgg11_w2/pgd_at/dense/checkpoint.pt")
    args = p.parse_args()
    data = [f"data.train_path={SHARED / 'cifar10-subset-train.npz'}",
            f"data.test_path={SHARED / 'cifar10-subset-test.npz'}", "data.val_size=0", "data.calibration_size=512"]
    data += [f"model.arch={args.arch}", f"train.method={args.train_method}"]
    base = load_params(ROOT / "params.yaml", [f"grid={args.grid}", *data])
    overrides = [f"grid={args.grid}", *data, "train.val_pgd_steps=0", "prune.score_epochs=1", "prune.sparsity=0.9"]
    splits = data_mod.load_splits(load_params(ROOT / "params.yaml", overrides).data, with_test=False)
    params = load_params(ROOT / "params.yaml", overrides + ["train.epochs=1"])
    with tempfile.TemporaryDirectory() as out:   # one epoch of the dense recipe
        train_epoch = train(params, out, log=lambda m: None)["epoch_seconds"]

    runtime = devices.setup(params.device, lambda m: None)
    result = {"grid": args.grid, "arch": args.arch, "train_method": args.train_method,
              "finetune_method": base.prune.finetune_method, "train_images": len(splits.train),
              "dense_epochs": base.train.epochs, "dense_epoch_seconds": train_epoch,
              "dense_train_seconds": train_epoch * base.train.epochs,
              "prune_steps": base.prune.steps, "score_epochs": base.prune.score_epochs}
    for method in ("hydra", "harp"):
        model, state = load_model(ROOT / args.checkpoint, runtime)
        arch = state["arch"]
        _, found = groups_mod.find_groups(model, arch["input_size"], arch["num_classes"])
        method_params = load_params(ROOT / "params.yaml", overrides + [f"prune.method={method}"])
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            learned_solver(model, found, arch, method_params, types.SimpleNamespace(
                train=splits.train, calibration=splits.calibration, spec=splits.spec), runtime, 0.3,
                budget_counts(model, arch["input_size"], None), [g.channels for g in found], {}, lambda m: None,
                step=1, run_dir=Path(out))
            seconds = time.perf_counter() - started
        run = seconds * base.prune.score_epochs * base.prune.steps
        result[method] = {"score_epoch_seconds": seconds, "run_scoring_seconds": run,
                          "share_of_dense_training": run / result["dense_train_seconds"]}
    with tempfile.TemporaryDirectory() as out:
        mrs = run_mrs(load_params(ROOT / "params.yaml", overrides), ROOT / args.checkpoint, out, log=lambda m: None)
    dense_seconds = result["dense_train_seconds"]
    result["mrs"] = {"seconds": mrs["seconds"], "share_of_dense_training": mrs["seconds"] / dense_seconds,
                     # at most: later steps measure smaller models
                     "per_run_share_at_most": mrs["seconds"] * base.prune.steps / dense_seconds}
    write("score-cost", result)


if __name__ == "__main__":
    main()
