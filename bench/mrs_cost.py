"""Benchmark d of docs/performance.md: the cost of one MRS measurement (every group of the
model, `mrpf mrs`) as a fraction of the baseline's training time, at PGD-10 and at the
default probe attack (PGD-5), with the rank agreement of the two MRS vectors (Spearman).
The baseline's training time is measured now, with the same code: one epoch of its recipe
times its epochs (the time recorded with the checkpoint came from older code).

    python -m bench.mrs_cost [--params configs/core-acceptance.yaml] [--checkpoint runs/core-acceptance/checkpoint.pt]
"""

from __future__ import annotations

import argparse
import json
import tempfile

from scipy import stats

from bench.common import ROOT, write
from mrpf.config import load_params
from mrpf.sensitivity import run_mrs
from mrpf.training import train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="configs/core-acceptance.yaml")
    p.add_argument("--checkpoint", default="runs/core-acceptance/checkpoint.pt")
    args = p.parse_args()
    checkpoint = ROOT / args.checkpoint
    recorded = json.loads((checkpoint.parent / "train_metrics.json").read_text())["train_seconds"]
    params = load_params(ROOT / args.params)
    with tempfile.TemporaryDirectory() as out:
        one = train(load_params(ROOT / args.params, ["train.epochs=1", "train.val_pgd_steps=0"]), out,
                    log=lambda m: None)
    train_seconds = one["epoch_seconds"] * params.train.epochs
    result = {"checkpoint": args.checkpoint, "baseline_train_seconds": train_seconds,
              "baseline_epoch_seconds": one["epoch_seconds"], "baseline_epochs": params.train.epochs,
              "recorded_train_seconds": recorded}
    mrs = {}
    for steps in (10, 5):
        params = load_params(ROOT / args.params, [f"mrs.steps={steps}"])
        with tempfile.TemporaryDirectory() as out:
            measured = run_mrs(params, checkpoint, out, log=lambda m: None)
        mrs[steps] = [g["mrs"] for g in measured["groups"]]
        result[f"pgd{steps}"] = {"seconds": measured["seconds"], "fraction": measured["seconds"] / train_seconds,
                                 "groups": len(mrs[steps]), "mrs": mrs[steps]}
    result["spearman_pgd5_vs_pgd10"] = float(stats.spearmanr(mrs[10], mrs[5]).statistic)
    write("mrs-cost", result)


if __name__ == "__main__":
    main()
