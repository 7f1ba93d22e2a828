"""Iterative robust pruning (``mrpf prune``): MRPF and its baselines through one loop.

For T steps (``prune.steps``), step t reaches the cumulative budget S*t/T of the dense
model: the method scores the current model, channels are removed physically, and the
model is fine-tuned ``prune.finetune_epochs`` epochs with ``prune.finetune_method``; a
final fine-tune of ``prune.final_epochs`` follows. Every method gets the same schedule
and fine-tuning budget, so the comparison isolates the pruning criterion.

Methods:
- ``mrpf``: per-group ratios from MRS (robust signal) by the budget solve (allocation.py);
- ``mrpf_clean``: the same with the clean signal (delta = 0);
- ``uniform_l1``: the same ratio in every group (alpha = 0, no cost weights);
- ``global_magnitude``: one global threshold on channel magnitude (mean |w|);
- ``taylor_adv``: one global threshold on first-order Taylor importance |sum w dL_adv/dw|
  (Molchanov et al., 2019) on the calibration set, L_adv = CE on PGD examples;
- ``random``: one global threshold on random scores.
Within a group, ``mrpf``/``mrpf_clean``/``uniform_l1`` remove the smallest-magnitude channels.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import allocation, devices
from . import data as data_mod
from . import groups as groups_mod
from .attacks import pgd
from .config import as_float
from .errors import MrpfError
from .evaluation import load_model
from .io import read_json, remove_stale_temporaries, save_checkpoint, write_json
from .sensitivity import MrsSettings, compute_mrs, seeded_scope
from .training import adversary_from, train

ALLOCATION_METHODS = ("mrpf", "mrpf_clean", "uniform_l1")
GLOBAL_METHODS = ("global_magnitude", "taylor_adv", "random")
METHODS = ALLOCATION_METHODS + GLOBAL_METHODS


def mrs_settings(params: dict, signal: str | None = None) -> MrsSettings:
    m = params["mrs"]
    return MrsSettings(probe_ratio=as_float(m["probe_ratio"], "mrs.probe_ratio"), attack=m["attack"],
                       signal=signal or m["signal"], seed=params["seed"])


def mrs_adversary(params: dict):
    adv = adversary_from(params)
    steps = params["mrs"]["steps"]
    return type(adv)(eps=adv.eps, step_size=2.5 * adv.eps / max(steps, 1), steps=steps, norm=adv.norm)


def _mean_magnitude(model, group) -> torch.Tensor:
    params = groups_mod.out_channel_params(model, group)
    total = sum(p.detach().abs().flatten(1).sum(1) if p.dim() > 1 else p.detach().abs() for p in params)
    size = sum(p[0].numel() for p in params)
    return total / size


def _taylor(model, found, calibration, params, runtime) -> list[torch.Tensor]:
    """|sum_c w_c dL_adv/dw_c| per channel (Molchanov et al., 2019), L_adv = summed CE on PGD
    examples of the calibration set; torch's global random state is left as it was."""
    if len(calibration) == 0:
        raise MrpfError("taylor_adv needs calibration images: data.calibration_size must be positive")
    with seeded_scope(runtime.device):
        return _taylor_scores(model, found, calibration, params, runtime)


def _taylor_scores(model, found, calibration, params, runtime) -> list[torch.Tensor]:
    adversary = mrs_adversary(params)
    model.eval()
    for p in model.parameters():
        p.grad = None
    for i, (x, y) in enumerate(data_mod.Batches(calibration, params["mrs"]["batch_size"], runtime.device,
                                                channels_last=runtime.channels_last)):
        torch.manual_seed(params["seed"] + i)
        x_adv = pgd(model, x, y, eps=adversary.eps, step_size=adversary.step_size, steps=adversary.steps,
                    norm=adversary.norm)
        F.cross_entropy(model(x_adv), y, reduction="sum").backward()
    scores = []
    for group in found:
        total = 0
        for p in groups_mod.out_channel_params(model, group):
            total = total + (p.detach() * p.grad).flatten(1).sum(1) if p.dim() > 1 else total + p.detach() * p.grad
        scores.append(total.abs())
    for p in model.parameters():
        p.grad = None
    return scores


def random_scores(found, seed: int, step: int) -> list[torch.Tensor]:
    """The ``random`` baseline's channel scores: uniform, drawn anew at every pruning step."""
    gen = torch.Generator().manual_seed(seed * 1_000 + step)
    return [torch.rand(g.channels, generator=gen) for g in found]


def _global_plan(model, found, scores, budget, metric, caps, input_size, num_classes, dense,
                 round_to: int = 1) -> tuple[dict, float]:
    """The k globally lowest-scored channels (at most ``caps[g]`` of group g: the one r_max cap,
    ``allocation.removal_cap``) reaching the budget, each group's count then adjusted by
    ``allocation.rounded_removal``."""
    ranked = sorted((float(s), g.id, c) for g, sc in zip(found, scores) for c, s in enumerate(sc.tolist()))
    by_score = {g.id: [] for g in found}       # each group's channels, lowest score first
    for _, gid, c in ranked:
        by_score[gid].append(c)
    channels = {g.id: g.channels for g in found}
    cap = {g.id: c for g, c in zip(found, caps)}

    def plan(k):
        counts = {g.id: 0 for g in found}
        for _, gid, _ in ranked[:k]:
            counts[gid] = min(counts[gid] + 1, cap[gid])
        return {gid: by_score[gid][:allocation.rounded_removal(channels[gid], n, round_to, cap[gid])]
                for gid, n in counts.items()}

    def achieved(k):
        pruned = copy.deepcopy(model)
        graph, pg = groups_mod.find_groups(pruned, input_size, num_classes)
        groups_mod.prune(graph, pg, plan(k))
        return 1 - allocation.count(pruned, input_size)[metric] / dense[metric]

    lo, hi = 0, len(ranked)
    if achieved(hi) < budget:
        raise MrpfError(f"a {budget:.0%} {metric} reduction is out of reach within the r_max cap of each group")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if achieved(mid) >= budget:
            hi = mid
        else:
            lo = mid
    return plan(hi), achieved(hi)


def dense_widths(model, arch: dict) -> dict[str, int]:
    """Each group's width in the dense model, by root module name (r_max holds against it)."""
    _, found = groups_mod.find_groups(model, arch["input_size"], arch["num_classes"])
    return {g.root: g.channels for g in found}


def prune_step(model, arch, params, calibration, runtime, budget, dense, log, *, step: int = 1,
               widths: dict[str, int] | None = None) -> tuple[dict, list]:
    """Prune ``model`` in place to ``budget`` (relative to ``dense`` counts) at pruning step
    ``step``, no group below 1 - r_max of its dense width (``widths``; default: the current
    ones); return the step record and the pruning history of this step."""
    pp = params["prune"]
    method = pp["method"]
    arch_size, classes = arch["input_size"], arch["num_classes"]
    graph, found = groups_mod.find_groups(model, arch_size, classes)
    r_max = as_float(pp["r_max"], "prune.r_max")
    widths = widths or {}
    dense_channels = [widths.get(g.root, g.channels) for g in found]
    record: dict = {"budget": budget, "groups": [g.describe() for g in found]}
    started = time.perf_counter()
    if method in ALLOCATION_METHODS:
        if method == "uniform_l1":
            mrs, alpha, cost_aware = [1.0] * len(found), 0.0, False
        else:
            signal = "clean" if method == "mrpf_clean" else None
            result = compute_mrs(model, found, calibration, mrs_adversary(params), runtime,
                                 mrs_settings(params, signal), params["mrs"]["batch_size"], log)
            record["mrs"] = result
            mrs = [row["mrs"] for row in result["groups"]]
            alpha, cost_aware = as_float(pp["alpha"], "prune.alpha"), bool(pp["cost_aware"])
        solved = allocation.solve(model, found, mrs, input_size=arch_size, num_classes=classes, budget=budget,
                                  metric=pp["metric"], alpha=alpha, r_max=r_max, cost_aware=cost_aware, dense=dense,
                                  round_to=pp["round_to"], dense_channels=dense_channels)
        record["ratios"] = solved["ratios"]
        history = allocation.apply_ratios(model, arch_size, classes, solved["ratios"], pp["round_to"], solved["caps"])
    else:
        if method == "global_magnitude":
            scores = [_mean_magnitude(model, g) for g in found]
        elif method == "taylor_adv":
            scores = _taylor(model, found, calibration, params, runtime)
        else:
            scores = random_scores(found, params["seed"], step)
        caps = [allocation.removal_cap(g.channels, d, r_max) for g, d in zip(found, dense_channels)]
        remove, _ = _global_plan(model, found, scores, budget, pp["metric"], caps, arch_size, classes, dense,
                                 pp["round_to"])
        record["ratios"] = [len(remove[g.id]) / g.channels for g in found]
        history = groups_mod.prune(graph, found, remove)
    record["scoring_seconds"] = time.perf_counter() - started  # MRS / scores + budget solve
    counts = allocation.count(model, arch_size)
    record.update(counts=counts, achieved=1 - counts[pp["metric"]] / dense[pp["metric"]])
    return record, history


def finetune_params(params: dict, epochs: int) -> dict:
    ft = copy.deepcopy(params)
    pp = params["prune"]
    ft["train"].update(epochs=epochs, lr=pp["finetune_lr"], method=pp["finetune_method"], schedule="cosine")
    return ft


STEP_FILE = "step.json"


def _resume_key(params: dict) -> str:
    """What a completed step must match to be reused (everything but the device)."""
    import json

    return json.dumps({k: v for k, v in params.items() if k != "device"}, sort_keys=True, default=str)


def completed_steps(run_dir: Path, params: dict) -> list[dict]:
    """Records of the steps 1..k an earlier, interrupted run of the same params completed."""
    steps = []
    for t in range(1, params["prune"]["steps"] + 1):
        marker = run_dir / f"step{t}" / STEP_FILE
        if not (marker.is_file() and (marker.parent / "checkpoint.pt").is_file()):
            break
        saved = read_json(marker)
        if saved.get("resume_key") != _resume_key(params):
            raise MrpfError(f"{marker} belongs to a run with different parameters; "
                            f"delete {run_dir} or choose another run name")
        steps.append(saved["record"])
    return steps


def run_prune(params: dict, checkpoint: str | Path, run_dir: str | Path, log=print) -> dict:
    """The whole iterative prune + fine-tune; writes ``checkpoint.pt`` and ``prune.json`` to ``run_dir``."""
    run_dir = Path(run_dir)
    pp = params["prune"]
    if pp["method"] not in METHODS:
        raise MrpfError(f"prune.method: unknown method {pp['method']!r} (choose from {', '.join(METHODS)})")
    sparsity = as_float(pp["sparsity"], "prune.sparsity")
    if not 0 < sparsity < 1:
        raise MrpfError(f"prune.sparsity: must lie in (0, 1), got {pp['sparsity']!r}")
    runtime = devices.setup(params["device"], log)
    model, state = load_model(checkpoint, runtime)
    arch = copy.deepcopy(state["arch"])
    arch.setdefault("pruning_history", [])
    splits = data_mod.load_splits(params, with_test=False)
    dense = allocation.count(model, arch["input_size"])
    widths = dense_widths(model, arch)
    allocation.check_reachable(model, arch["input_size"], arch["num_classes"], sparsity, pp["metric"],
                               as_float(pp["r_max"], "prune.r_max"), dense, pp["round_to"])
    remove_stale_temporaries(run_dir)
    steps = completed_steps(run_dir, params)
    if steps:   # resume after the last completed step: its fine-tuned, pruned model
        model, state = load_model(run_dir / f"step{len(steps)}" / "checkpoint.pt", runtime)
        arch = copy.deepcopy(state["arch"])
        log(f"resuming {run_dir.name} after step {len(steps)}/{pp['steps']}")
    for t in range(len(steps) + 1, pp["steps"] + 1):
        budget = sparsity * t / pp["steps"]
        log(f"step {t}/{pp['steps']}: {pp['method']} to {budget:.1%} {pp['metric']} reduction")
        record, history = prune_step(model, arch, params, splits.calibration, runtime, budget, dense, log, step=t,
                                     widths=widths)
        arch["pruning_history"] = arch["pruning_history"] + history
        epochs = pp["finetune_epochs"] + (pp["final_epochs"] if t == pp["steps"] else 0)
        record["finetune"] = train(finetune_params(params, epochs), run_dir / f"step{t}", log, model=model, arch=arch)
        # written after the step's checkpoint, so it marks the step complete
        write_json(run_dir / f"step{t}" / STEP_FILE, {"resume_key": _resume_key(params), "record": record})
        steps.append(record)
        log(f"step {t}: achieved {record['achieved']:.1%}, val PGD {record['finetune'].get('val_pgd_acc')}")
    summary = {"method": pp["method"], "sparsity": sparsity, "metric": pp["metric"], "dense": dense,
               "counts": steps[-1]["counts"], "achieved": steps[-1]["achieved"], "steps": steps}
    save_checkpoint(run_dir / "checkpoint.pt", arch, model.state_dict(), params=params)
    write_json(run_dir / "prune.json", summary)
    for t in range(1, pp["steps"] + 1):     # done: like training's last.pt, the resume markers go
        (run_dir / f"step{t}" / STEP_FILE).unlink(missing_ok=True)
    return summary


def run_mrs(params: dict, checkpoint: str | Path, run_dir: str | Path, log=print) -> dict:
    """``mrpf mrs``: MRS of every group of a checkpoint, the ratios MRPF would allocate at
    ``prune.sparsity``; writes ``mrs.json`` and ``mrs.png`` to ``run_dir``."""
    from .reporting import plot_mrs

    run_dir = Path(run_dir)
    runtime = devices.setup(params["device"], log)
    model, state = load_model(checkpoint, runtime)
    arch = state["arch"]
    splits = data_mod.load_splits(params, with_test=False)
    _, found = groups_mod.find_groups(model, arch["input_size"], arch["num_classes"])
    started = time.perf_counter()
    result = compute_mrs(model, found, splits.calibration, mrs_adversary(params), runtime, mrs_settings(params),
                         params["mrs"]["batch_size"], log)
    result["seconds"] = time.perf_counter() - started
    pp = params["prune"]
    solved = allocation.solve(model, found, [r["mrs"] for r in result["groups"]], input_size=arch["input_size"],
                              num_classes=arch["num_classes"], budget=as_float(pp["sparsity"], "prune.sparsity"),
                              metric=pp["metric"], alpha=as_float(pp["alpha"], "prune.alpha"),
                              r_max=as_float(pp["r_max"], "prune.r_max"), cost_aware=bool(pp["cost_aware"]),
                              round_to=pp["round_to"])
    for row, ratio in zip(result["groups"], solved["ratios"]):
        row["ratio"] = ratio
    result["allocation"] = {"sparsity": pp["sparsity"], "metric": pp["metric"], "achieved": solved["achieved"]}
    plot_mrs(result, solved["ratios"], run_dir / "mrs.png",
             f"MRS and ratios at {float(pp['sparsity']):.0%} {pp['metric']} reduction ({arch['name']})")
    write_json(run_dir / "mrs.json", result)
    return result
