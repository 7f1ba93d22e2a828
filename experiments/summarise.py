"""Tables of docs/results-cifar10-subset.md from the runs of experiments/cifar10-subset.jobs.

    python experiments/summarise.py [RUNS_DIR] [DENSE_RUN_DIR]   (defaults: runs/compare runs/core-acceptance)

Differences to uniform_l1 are paired over the same 2,000 test images (mrpf.statistics);
the spread across fine-tuning seeds is the sample standard deviation, and the interval
across seeds is ``seed_image_difference`` (crossed seeds x test images).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from tabulate import tabulate

from mrpf.statistics import paired_difference, seed_image_difference, spread

METHODS = ["mrpf", "uniform_l1", "mrpf_clean", "global_magnitude", "taylor_adv", "random"]
SPARSITIES = ["0.5", "0.7"]


def load(folder: Path) -> dict | None:
    if not (folder / "eval.json").is_file():
        return None
    run = json.loads((folder / "eval.json").read_text())
    run["prune"] = json.loads((folder / "prune.json").read_text())
    with np.load(folder / "eval_per_image.npz") as npz:
        run["outcomes"] = {k: npz[k] for k in npz.files}
    return run


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def delta(a: dict, b: dict, key: str) -> str:
    d = paired_difference(a["outcomes"][key], b["outcomes"][key])
    return f"{100 * d['diff']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]"


def main(runs: Path, dense_dir: Path) -> None:
    train_seconds = json.loads((dense_dir / "train_metrics.json").read_text())["train_seconds"]
    print("### All six methods, fine-tuning seed 0\n")
    rows = []
    for s in SPARSITIES:
        base = load(runs / f"uniform_l1-{s}-s0")
        for m in METHODS:
            run = load(runs / f"{m}-{s}-s0")
            if run is None:
                rows.append([s, m] + ["(not run)"] * 7)
                continue
            rows.append([s, m, pct(run["clean_acc"]), pct(run["pgd_acc"]), f"{run['params'] / 1e6:.3f}",
                         f"{run['macs'] / 1e6:.2f}", f"{100 * run['prune']['achieved']:.1f}",
                         "—" if m == "uniform_l1" or base is None else delta(run, base, "pgd"),
                         "—" if m == "uniform_l1" or base is None else delta(run, base, "clean")])
    print(tabulate(rows, headers=["S", "method", "clean %", "PGD-20 %", "params (M)", "MACs (M)", "MACs removed %",
                                  "Δ PGD-20 vs uniform_l1 [95 % CI]", "Δ clean [95 % CI]"], tablefmt="github",
                   disable_numparse=True))

    print("\n### mrpf vs uniform_l1 across fine-tuning seeds\n")
    rows = []
    for s in SPARSITIES:
        per_seed = {}
        for seed in range(3):
            a, b = load(runs / f"mrpf-{s}-s{seed}"), load(runs / f"uniform_l1-{s}-s{seed}")
            if a is None or b is None:
                continue
            per_seed[seed] = (a, b)
            rows.append([s, seed, pct(a["clean_acc"]), pct(b["clean_acc"]), pct(a["pgd_acc"]), pct(b["pgd_acc"]),
                         delta(a, b, "pgd")])
        if len(per_seed) > 1:
            da = spread([a["pgd_acc"] for a, _ in per_seed.values()])
            db = spread([b["pgd_acc"] for _, b in per_seed.values()])
            dd = spread([a["pgd_acc"] - b["pgd_acc"] for a, b in per_seed.values()])
            ca = spread([a["clean_acc"] for a, _ in per_seed.values()])
            cb = spread([b["clean_acc"] for _, b in per_seed.values()])
            rows.append([s, f"mean ± sd ({len(per_seed)})", f"{100 * ca['mean']:.2f} ± {100 * ca['sd']:.2f}",
                         f"{100 * cb['mean']:.2f} ± {100 * cb['sd']:.2f}",
                         f"{100 * da['mean']:.2f} ± {100 * da['sd']:.2f}",
                         f"{100 * db['mean']:.2f} ± {100 * db['sd']:.2f}",
                         f"{100 * dd['mean']:+.2f} ± {100 * dd['sd']:.2f} (seed sd)"])
            both = seed_image_difference(np.stack([a["outcomes"]["pgd"] for a, _ in per_seed.values()]),
                                         np.stack([b["outcomes"]["pgd"] for _, b in per_seed.values()]))
            rows.append([s, f"seeds x images ({len(per_seed)} x 2,000)", "", "", "", "",
                         f"{100 * both['diff']:+.2f} [{100 * both['low']:+.2f}, {100 * both['high']:+.2f}]"])
    print(tabulate(rows, headers=["S", "seed", "mrpf clean %", "uniform clean %", "mrpf PGD-20 %",
                                  "uniform PGD-20 %", "Δ PGD-20 [95 % CI, per image]"], tablefmt="github",
                   disable_numparse=True))

    print("\n### Ablations (70 % MACs, seed 0; Δ to uniform_l1 seed 0)\n")
    base = load(runs / "uniform_l1-0.7-s0")
    rows = []
    for name in ["mrpf-0.7-s0", "mrpf_clean-0.7-s0", "abl-alpha2-0.7-s0", "abl-nocost-0.7-s0", "abl-fixed-0.7-s0",
                 "abl-rho025-0.7-s0"]:
        run = load(runs / name)
        if run is None or base is None:
            rows.append([name] + ["(not run)"] * 4)
            continue
        rows.append([name, pct(run["clean_acc"]), pct(run["pgd_acc"]), f"{run['params'] / 1e6:.3f}",
                     delta(run, base, "pgd")])
    print(tabulate(rows, headers=["run", "clean %", "PGD-20 %", "params (M)", "Δ PGD-20 [95 % CI]"],
                   tablefmt="github", disable_numparse=True))

    print("\n### Cost of scoring (MRS + budget solve) per run\n")
    rows = []
    for folder in sorted(runs.glob("*-s*")):
        run = load(folder)
        if run is None:
            continue
        seconds = [st.get("scoring_seconds") for st in run["prune"]["steps"]]
        if None in seconds:
            continue
        rows.append([folder.name, f"{sum(seconds):.0f}", f"{100 * sum(seconds) / train_seconds:.1f}"])
    print(tabulate(rows, headers=["run", "scoring s (all steps, 1 thread)", "% of dense training (866 s, 2 threads)"],
                   tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    args = sys.argv[1:]
    main(Path(args[0] if args else "runs/compare"), Path(args[1] if len(args) > 1 else "runs/core-acceptance"))
