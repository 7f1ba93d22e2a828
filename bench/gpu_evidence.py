"""The one-GPU evidence run: does MRPF keep more robustness than uniform L1 at 90 % MACs
removed, at full width on all of CIFAR-10, inside one device call?

Steps, each a `mrpf` verb with configs/gpu-evidence.yaml, timed against ``--budget-s``:

1. ``mrpf data``: the 50,000 + 5,000 images of the WebDataset shards, decoded once.
2. A one-epoch probe of dense PGD-AT on a 5,000-image slice gives the epoch time; dense
   training then gets as many epochs as fit the budget after what the later steps need
   (the budget shortens training, it does not overrun).
3. ``mrpf mrs`` and ``mrpf prune`` at 90 % for mrpf (the paper's rule), mrpf with
   ``prune.allocation: joint_search`` (MRPF's default, its best variant on the CPU evidence grid) and
   uniform_l1 (TRADES fine-tuning, channels a multiple of 8), then clean and PGD-20 on the
   5,000 test images.
4. AutoAttack (standard) on as many of the first 1,000 test images as the time left allows,
   for the dense model and the pruned ones; then, while time is left, HYDRA and HARP at 90 %
   (clean and PGD-20) and mrpf and uniform_l1 at 70 %.
5. The paired 95 % intervals (each method minus uniform_l1, same images) are printed and written to
   ``bench/results/gpu-evidence-TAG.json`` (and ``$OUT``).

    python -m bench.gpu_evidence [--budget-s 480] [--data DIR]
    python -m bench.gpu_evidence --smoke --data DIR   # every step but 70 %, tiny, on the CPU, untimed
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import write
from mrpf.statistics import paired_difference

PARAMS = "configs/gpu-evidence.yaml"
PROBE_IMAGES = 5000
# Cost of the later steps in dense PGD-AT epochs (estimates, checked against the clock as the
# run goes): a prune run (MRS + 5 TRADES epochs at shrinking width) and PGD-20 of one model on
# 5,000 images; AutoAttack's cost per image is measured on the first model it attacks.
PRUNE_EPOCHS = 4.5
EVAL_EPOCHS = 0.5
# the pruned models at 90 %: name -> (prune method, overrides); at 70 % only mrpf and the baseline
VARIANTS = {"mrpf": ("mrpf", ["prune.allocation=inverse_mrs"]),           # the paper's rule
            "mrpf_joint": ("mrpf", ["prune.allocation=joint_search"]),     # the default
            "uniform_l1": ("uniform_l1", [])}
BASELINE = "uniform_l1"
# the learned methods (docs/method.md, "Learned methods"), at 90 % when time is left after AutoAttack:
# one score-learning epoch per pruning step, each about 1.5 dense epochs (docs/performance.md)
LEARNED = {"hydra": ("hydra", ["prune.score_epochs=1"]), "harp": ("harp", ["prune.score_epochs=1"])}
LEARNED_EPOCHS = PRUNE_EPOCHS + 3 * 1.5
SMOKE = ["device.name=cpu", "model.arch=vgg11_w8", "train.batch_size=64", "data.val_size=100",
         "data.calibration_size=64", "mrs.batch_size=64", "mrs.steps=1", "evaluate.n_images=200",
         "evaluate.batch_size=200", "prune.steps=1", "prune.finetune_epochs=1", "prune.final_epochs=0",
         "prune.round_to=1", "train.steps=1", "train.val_pgd_steps=1", "evaluate.pgd_steps=2",
         "evaluate.step_size=null", "device.bf16=false", "device.cuda_graphs=false"]
SMOKE_AA_IMAGES = 10


class Clock:
    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.monotonic(), budget_s

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def stamp(self) -> str:
        return f"[{time.monotonic() - self.start:5.0f}s]"


def mrpf(argv: list[str], log: Path) -> float:
    """Run one `mrpf` verb (its output appended to ``log``); its wall time in seconds."""
    started = time.monotonic()
    with open(log, "a") as f:
        f.write(f"\n$ mrpf {' '.join(argv)}\n")
        f.flush()
        done = subprocess.run([sys.executable, "-m", "mrpf", *argv], stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"mrpf {argv[0]} failed ({done.returncode}); see {log}")
    return time.monotonic() - started


def slice_npz(source: Path, target: Path, n: int) -> None:
    with np.load(source) as f:
        np.savez(target, x=f["x"][:n], y=f["y"][:n], classes=f["classes"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-s", type=float, default=480, help="wall-clock budget of the whole run (s)")
    p.add_argument("--data", default=None, help="folder with cifar10-{train,test}-*.tar.gz "
                   "(default: .gpu/data, else ../shared/data)")
    p.add_argument("--work", default="runs/gpu-evidence", help="scratch folder (replaced)")
    p.add_argument("--smoke", action="store_true", help="tiny, on the CPU: checks the script, measures nothing")
    args = p.parse_args()
    data = Path(args.data or next((d for d in (".gpu/data", "../shared/data") if Path(d).is_dir()), ".gpu/data"))
    tag = "cpu-smoke" if args.smoke else "cuda"
    clock = Clock(args.budget_s)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = work / "log.txt"
    extra = SMOKE if args.smoke else []
    common = ["--params", PARAMS, f"data.offline_dir={data}", *extra]

    def say(text: str) -> None:
        print(f"{clock.stamp()} {text}", flush=True)

    mrpf(["data", "--out", str(work / "data"), *common], log)
    with np.load(work / "data/train.npz") as f:
        n_train = len(f["y"])
    say(f"data: {n_train} training images from {data}")
    paths = [f"data.train_path={work}/data/train.npz", f"data.test_path={work}/data/test.npz"]

    probe_images = min(PROBE_IMAGES, n_train // 2)
    slice_npz(work / "data/train.npz", work / "probe.npz", probe_images)
    mrpf(["train", "--runs-dir", str(work), "--run", "probe", *common, f"data.train_path={work}/probe.npz",
          f"data.test_path={work}/data/test.npz", "train.epochs=1", "data.val_size=100"], log)
    probe_s = json.loads((work / "probe/train_metrics.json").read_text())["train_seconds"]
    epoch_s = probe_s * (n_train - 1000) / (probe_images - 100)
    reserve = (len(VARIANTS) * PRUNE_EPOCHS + (len(VARIANTS) + 1) * EVAL_EPOCHS) * epoch_s
    epochs = max(1, min(1 if args.smoke else 30, math.floor((0.75 * clock.left() - reserve) / (1.1 * epoch_s))))
    say(f"probe: {epoch_s:.1f} s per dense epoch -> {epochs} epochs of dense PGD-AT")

    run = ["--runs-dir", str(work), *common, *paths]
    mrpf(["train", "--run", "dense", *run, f"train.epochs={epochs}"], log)
    dense = str(work / "dense/checkpoint.pt")
    mrpf(["mrs", "--run", "mrs", "--checkpoint", dense, "--sparsities", "0.7,0.9", *run], log)
    say("dense model trained, MRS measured")
    models = ["dense"]

    def prune(sparsity: str, variants: list[str]) -> None:
        for variant in variants:
            method, overrides = {**VARIANTS, **LEARNED}[variant]
            name = f"{variant}-{sparsity}"
            mrs = ["--mrs", str(work / "mrs/mrs.json")] if method == "mrpf" else []
            mrpf(["prune", "--run", name, "--checkpoint", dense, "--method", method, "--sparsity", sparsity, *mrs,
                  *run, *overrides], log)
            models.append(name)
        say(f"pruned to {sparsity}: {', '.join(variants)}")

    prune("0.9", list(VARIANTS))
    for model in models:
        mrpf(["evaluate", "--run", model, *run, "evaluate.attacks=[clean,pgd]"], log)
    say("clean and PGD-20 evaluated")

    if args.smoke:   # checks the step on the dense model and the pair it compares; times nothing
        aa_models, aa_images = ["dense", "mrpf-0.9", f"{BASELINE}-0.9"], SMOKE_AA_IMAGES
    else:
        unit = 100   # AutoAttack images: timed on this many, run in multiples of it
        first_s = mrpf(["evaluate", "--run", "dense", *run, "evaluate.attacks=[autoattack]",
                        f"evaluate.autoattack_images={unit}", "--out", str(work / "dense/eval_aa_probe.json")], log)
        per_image = first_s / unit
        fit = int(0.6 * clock.left() / (len(models) * per_image)) // unit * unit
        aa_models, aa_images = list(models), min(1000, fit)
        if aa_images < unit:
            aa_models, aa_images = [], 0
            say(f"AutoAttack skipped: {per_image:.2f} s per image leaves room for {fit} images")
    for model in aa_models:
        mrpf(["evaluate", "--run", model, *run, "evaluate.attacks=[autoattack]",
              f"evaluate.autoattack_images={aa_images}", "--out", str(work / model / "eval_aa.json")], log)
    if aa_models:
        say(f"AutoAttack on {aa_images} images: {', '.join(aa_models)}")
    # the smoke run takes every step but the 70 % one, whatever its clock says
    if args.smoke or clock.left() > (len(LEARNED) * (LEARNED_EPOCHS + EVAL_EPOCHS)) * epoch_s * 1.2:
        prune("0.9", list(LEARNED))
        for model in models[-len(LEARNED):]:
            mrpf(["evaluate", "--run", model, *run, "evaluate.attacks=[clean,pgd]"], log)
    else:
        say("hydra and harp skipped: too little time left")
    # the smoke run stops before 70 %: the same prune and evaluate calls as above
    if not args.smoke and clock.left() > (2 * PRUNE_EPOCHS + 2 * EVAL_EPOCHS) * epoch_s * 1.2:
        prune("0.7", ["mrpf", BASELINE])
        for model in models[-2:]:
            mrpf(["evaluate", "--run", model, *run, "evaluate.attacks=[clean,pgd]"], log)

    result = {"device": tag, "budget_s": args.budget_s, "train_images": n_train, "dense_epochs": epochs,
              "epoch_s": epoch_s, "autoattack_images": aa_images, "models": {}, "differences": {}}
    for model in models:
        metrics = json.loads((work / model / "eval.json").read_text())
        if (work / model / "eval_aa.json").is_file():
            metrics["autoattack_acc"] = json.loads((work / model / "eval_aa.json").read_text())["autoattack_acc"]
        result["models"][model] = {k: metrics.get(k) for k in ("clean_acc", "pgd_acc", "autoattack_acc", "macs",
                                                                "params")}
    for model in models:
        variant, _, sparsity = model.rpartition("-")
        if model == "dense" or variant == BASELINE:
            continue
        for attack, stem in (("clean", "eval"), ("pgd", "eval"), ("autoattack", "eval_aa")):
            files = [work / f"{m}-{sparsity}" / f"{stem}_per_image.npz" for m in (variant, BASELINE)]
            if all(f.is_file() for f in files):
                a, b = (np.load(f)[attack] for f in files)
                d = paired_difference(a, b)
                key = f"{sparsity} {attack}" if variant == "mrpf" else f"{variant} {sparsity} {attack}"
                result["differences"][key] = d
                say(f"{sparsity} {attack:>10}: {variant} - {BASELINE} = {100 * d['diff']:+.2f} "
                    f"[{100 * d['low']:+.2f}, {100 * d['high']:+.2f}] points ({d['n']} images)")
    for model, m in result["models"].items():
        aa = "—" if m["autoattack_acc"] is None else f"{100 * m['autoattack_acc']:.1f}"
        say(f"{model:>16}: clean {100 * m['clean_acc']:.1f}  PGD-20 {100 * m['pgd_acc']:.1f}  AA {aa}  "
            f"MACs {m['macs'] / 1e6:.0f} M")
    if args.smoke:   # measures nothing: kept out of bench/results
        path = work / f"gpu-evidence-{tag}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
    else:
        path = write(f"gpu-evidence-{tag}", result)
    if os.environ.get("OUT"):
        shutil.copy(path, os.environ["OUT"])
        shutil.copy(log, Path(os.environ["OUT"]) / "gpu-evidence-log.txt")
    say(f"wrote {path}; {clock.left():.0f} s of the budget left")
    return 0


if __name__ == "__main__":
    sys.exit(main())
