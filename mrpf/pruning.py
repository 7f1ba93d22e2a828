"""Iterative robust pruning (``mrpf prune``): MRPF and its baselines through one loop.

For T steps (``prune.steps``), step t reaches the cumulative budget S*t/T of the dense
model: the method scores the current model, channels are removed physically, and the
model is fine-tuned ``prune.finetune_epochs`` epochs with ``prune.finetune_method``; a
final fine-tune of ``prune.final_epochs`` follows. Every method gets the same schedule
and fine-tuning budget, so the comparison isolates the pruning criterion.

Methods (``config.PRUNE_METHODS``):
- ``mrpf``: per-group ratios from MRS (robust signal) by the budget solve (allocation.py; with
  ``prune.allocation: joint_search`` the rule's strength is chosen on the pruned copies, selection.py);
- ``mrpf_clean``: the same with the clean signal (delta = 0);
- ``uniform_l1``: the same ratio in every group (alpha = 0, no cost weights);
- ``global_magnitude``, ``taylor_adv``, ``random``: one global threshold on channel scores
  (scoring.py);
- ``hydra``, ``harp``: channel scores (HARP: and per-group keep-rates) learned from the robust
  loss with the weights frozen (learned.py), then the lowest-scored channels removed.
Within a group, ``mrpf``/``mrpf_clean``/``uniform_l1`` remove the smallest-magnitude channels.
With ``mrs_path`` (the pipeline's ``mrs`` stage output), MRPF's first step takes the dense
model's MRS from that file instead of measuring it again; later steps measure the current model.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

from . import allocation, devices, latency, learned, scoring, selection, stopping
from . import data as data_mod
from . import groups as groups_mod
from .config import ALLOCATION_METHODS, LEARNED_METHODS, Params
from .errors import MrpfError
from .io import read_json, remove_stale_temporaries, save_checkpoint, write_json
from .latency import budget_counts
from .models import load_model
from .objectives import DISTILLATION, probe_adversary
from .sensitivity import check_reusable, compute_curves, compute_mrs, loss_curves, mrs_settings
from .timing import latency_ms
from .training import train, train_batches

STEP_FILE = "step.json"


def dense_widths(model, arch: dict) -> dict[str, int]:
    """Each group's width in the dense model, by root module name (r_max holds against it)."""
    _, found = groups_mod.find_groups(model, arch["input_size"], arch["num_classes"])
    return {g.root: g.channels for g in found}


def final_widths(model, arch: dict, dense: dict[str, int]) -> list[list]:
    """Each group's [root module name, channels kept, dense channels], in layer order (a list:
    JSON objects are written with sorted keys): the allocation a run ended with, recorded in
    prune.json so that reports need no checkpoint."""
    kept = dense_widths(model, arch)
    return [[name, kept[name], dense[name]] for name, _ in model.named_modules() if name in kept and name in dense]


def allocation_solver(method: str, model, found, arch, params: Params, calibration, runtime, dense, dense_channels,
                      record: dict, log, *, dense_mrs: dict | None = None, table=None, tune=None):
    """``solve_for(target)``: the ``allocation.solve`` result (ratios, caps) of an allocation
    method (``config.ALLOCATION_METHODS``) on ``model`` at a budget; measures the MRS (or
    takes ``dense_mrs``) once, into ``record``."""
    pp = params.prune
    arch_size, classes = arch["input_size"], arch["num_classes"]
    curves, search = None, False
    if method == "uniform_l1":
        mrs, alpha, cost_aware = [1.0] * len(found), 0.0, False
    else:
        settings = mrs_settings(params, "clean" if method == "mrpf_clean" else None)
        if dense_mrs is not None:
            result = dense_mrs
            log("step 1: MRS of the dense model from the mrs stage")
        else:
            result = compute_mrs(model, found, calibration, probe_adversary(params), runtime, settings,
                                 params.mrs.batch_size, log)
        record["mrs"] = result
        mrs = [row["mrs"] for row in result["groups"]]
        alpha, cost_aware, search = pp.alpha, pp.cost_aware, pp.allocation == "joint_search"
        if pp.allocation == "loss_curve":
            record["curves"] = result["curves"] if dense_mrs is not None else compute_curves(
                model, found, calibration, probe_adversary(params), runtime, settings, params.mrs.curve_ratios,
                params.mrs.batch_size, log, measured=result)
            curves = loss_curves(record["curves"])

    def solve_at(target: float, strength: float = 1.0) -> dict:
        return allocation.solve(model, found, mrs, input_size=arch_size, num_classes=classes, budget=target,
                                metric=pp.metric, alpha=alpha, r_max=pp.r_max, cost_aware=cost_aware,
                                dense=dense, round_to=pp.round_to, dense_channels=dense_channels,
                                curves=curves, table=table, strength=strength)

    def solve_for(target: float) -> dict:
        if not search:
            return solve_at(target)
        solved, record["search"] = selection.select_strength(
            lambda strength: solve_at(target, strength), model, calibration, probe_adversary(params),
            runtime, params.mrs.batch_size, arch_size, classes, pp.round_to, log, tune)
        return solved

    return solve_for


def learned_solver(model, found, arch, params: Params, splits, runtime, budget, dense, dense_channels, record: dict,
                   log, *, step: int, run_dir: Path, teacher=None, table=None, tune=None):
    """HYDRA's or HARP's ``(solve_for, scores)``: the channel scores learned at ``budget``
    (learned.py), and ``solve_for(target)`` giving the ratios they are pruned at: HYDRA's masks
    keep the ratios of uniform_l1 (or mrpf: ``prune.score_ratios``); HARP's learned removal
    rates r_g are met on the measured model by the budget search, r_g' = min(cap, lambda r_g)."""
    pp = params.prune
    base = "mrpf" if pp.method == "hydra" and pp.score_ratios == "mrpf" else "uniform_l1"
    solve_for = allocation_solver(base, model, found, arch, params, splits.calibration, runtime, dense,
                                  dense_channels, record, log, table=table, tune=tune)
    start = solve_for(budget)
    keep = [g.channels - allocation.removal_count(g.channels, r, pp.round_to, cap)
            for g, r, cap in zip(found, start["ratios"], start["caps"])]
    harp = pp.method == "harp"
    costs = learned.layer_costs(model, found, arch["input_size"], pp.metric) if harp else None
    current = budget_counts(model, arch["input_size"], table)
    keep_target = (1 - budget) * dense[pp.metric] / current[pp.metric]
    result = learned.learn(model, found, keep, start["caps"], params, splits.train, splits.spec, runtime, teacher,
                           run_dir / f"step{step}", step, _resume_key(params), rates=harp, keep_target=keep_target,
                           costs=costs, log=log)
    record["learned"] = {"history": result.history, "initial_keep": keep}
    if not harp:
        return solve_for, result.scores
    record["learned"]["removal_rates"] = result.removal_rates
    rates = [max(r, 1e-6) for r in result.removal_rates]

    def solve_rates(target: float) -> dict:    # r_g = min(cap, lambda * w_g / MRS_g) with MRS_g = 1 / rate_g
        return allocation.solve(model, found, [1 / r for r in rates], input_size=arch["input_size"],
                                num_classes=arch["num_classes"], budget=target, metric=pp.metric, alpha=1.0,
                                r_max=pp.r_max, cost_aware=False, dense=dense, round_to=pp.round_to,
                                dense_channels=dense_channels, table=table)
    return solve_rates, result.scores


def prune_step(model, arch, params: Params, splits, runtime, budget, dense, log, *, step: int = 1,
               widths: dict[str, int] | None = None, dense_mrs: dict | None = None,
               table: latency.LatencyTable | None = None,
               meter: latency.MeasuredLatency | None = None, tune=None, teacher=None,
               run_dir: Path | None = None) -> tuple[dict, list]:
    """Prune ``model`` in place to ``budget`` (relative to ``dense`` counts) at pruning step
    ``step``, no group below 1 - r_max of its dense width (``widths``; default: the current
    ones); ``splits``: the run's data (calibration images; training images for hydra/harp);
    ``dense_mrs``: an MRS result of this very model to use instead of measuring it;
    ``table``: the latency table, for ``prune.metric`` latency; ``meter``: with it, the budget
    is met on the measured time (``latency.calibrate``); ``tune``: joint_search's short
    fine-tune of each candidate (``candidate_tuner``); ``teacher``, ``run_dir``: for score
    learning (the distillation teacher; where its resume state goes).
    Return the step record and the pruning history of this step."""
    pp = params.prune
    arch_size, classes = arch["input_size"], arch["num_classes"]
    _, found = groups_mod.find_groups(model, arch_size, classes)
    widths = widths or {}
    dense_channels = [widths.get(g.root, g.channels) for g in found]
    record: dict = {"budget": budget, "groups": [g.describe() for g in found]}
    started = time.perf_counter()
    if pp.method in ALLOCATION_METHODS or pp.method in LEARNED_METHODS:
        scores = None
        if pp.method in LEARNED_METHODS:
            solve_for, scores = learned_solver(model, found, arch, params, splits, runtime, budget, dense,
                                               dense_channels, record, log, step=step, run_dir=Path(run_dir),
                                               teacher=teacher, table=table, tune=tune)
        else:
            solve_for = allocation_solver(pp.method, model, found, arch, params, splits.calibration, runtime, dense,
                                          dense_channels, record, log, dense_mrs=dense_mrs, table=table, tune=tune)

        def plan(target: float):
            solved = solve_for(target)
            return solved["ratios"], lambda m: allocation.apply_ratios(m, arch_size, classes, solved["ratios"],
                                                                       pp.round_to, solved["caps"], scores)
    else:
        scores = scoring.scores_for(pp.method, model, found, splits.calibration, params, runtime, step)
        caps = [allocation.removal_cap(g.channels, d, pp.r_max) for g, d in zip(found, dense_channels)]

        def plan(target: float):
            remove, _ = scoring.global_plan(model, found, scores, target, pp.metric, caps, arch_size, classes,
                                            dense, pp.round_to, table)
            return ([len(remove[g.id]) / g.channels for g in found],
                    lambda m: groups_mod.prune(*groups_mod.find_groups(m, arch_size, classes), remove))
    if meter is None:
        record["ratios"], apply = plan(budget)
    else:
        record["ratios"], apply, record["latency_calibration"] = latency.calibrate(
            plan, budget, model, arch_size, dense["latency"], table, meter, log)
    history = apply(model)
    record["scoring_seconds"] = time.perf_counter() - started  # MRS / scores (learned ones too) + budget solve
    counts = budget_counts(model, arch_size, table)
    record.update(counts=counts, achieved=1 - counts[pp.metric] / dense[pp.metric])
    return record, history


def finetune_params(params: Params, epochs: int) -> Params:
    """The training params of a fine-tune: prune.finetune_* over train.*, cosine schedule."""
    pp = params.prune
    return params.replace("train", epochs=epochs, lr=pp.finetune_lr, method=pp.finetune_method, schedule="cosine")


def candidate_tuner(params: Params, train_images: data_mod.ImageSet, spec, runtime, teacher, step: int):
    """``tune(model)`` for joint_search (``prune.search_finetune_batches`` > 0), else None: that
    many batches of the run's fine-tuning (objective, lr) on the same shuffled, augmented training
    batches and attack starts for every candidate of the step (seed * 1000 + step)."""
    n = params.prune.search_finetune_batches
    if not n:     # config.parse refuses n > 0 with another allocation
        return None
    tuning = finetune_params(params, 1).replace("train", schedule="constant")
    seed = params.seed * 1000 + step
    batches = list(itertools.islice(data_mod.Batches(
        train_images, tuning.train.batch_size, runtime.device, shuffle=True, seed=seed,
        spec=spec if params.data.augment else None, channels_last=runtime.channels_last), n))
    return lambda model: train_batches(model, tuning, batches, runtime, teacher, seed)


def _resume_key(params: Params) -> str:
    """What a completed step must match to be reused (everything but the device)."""
    return json.dumps({k: v for k, v in params.to_dict().items() if k != "device"}, sort_keys=True)


def completed_steps(run_dir: Path, params: Params) -> list[dict]:
    """Records of the steps 1..k an earlier, interrupted run of the same params completed."""
    steps = []
    for t in range(1, params.prune.steps + 1):
        marker = run_dir / f"step{t}" / STEP_FILE
        if not (marker.is_file() and (marker.parent / "checkpoint.pt").is_file()):
            break
        saved = read_json(marker)
        if saved.get("resume_key") != _resume_key(params):
            raise MrpfError(f"{marker} belongs to a run with different parameters; "
                            f"delete {run_dir} or choose another run name")
        steps.append(saved["record"])
    return steps


def run_prune(params: Params, checkpoint: str | Path, run_dir: str | Path, log=print,
              mrs_path: str | Path | None = None) -> dict:
    """The whole iterative prune + fine-tune; writes ``checkpoint.pt`` and ``prune.json`` to
    ``run_dir``. ``mrs_path``: the dense model's ``mrs.json`` (``mrpf mrs``), reused by
    ``mrpf``'s first step when it was measured with this run's MRS settings."""
    run_dir = Path(run_dir)
    pp = params.prune
    runtime = devices.setup(params.device, log)
    model, state = load_model(checkpoint, runtime)
    arch = dict(state["arch"])
    arch.setdefault("pruning_history", [])
    splits = data_mod.load_splits(params.data, with_test=False)
    table = latency.table_if_budgeted(params, model, arch["input_size"], runtime, run_dir, log)   # reused on resume
    meter = None if table is None else latency.MeasuredLatency(
        load_model(checkpoint, runtime)[0], arch["input_size"], runtime, table.batch, params.evaluate.latency_repeats)
    dense = budget_counts(model, arch["input_size"], table)
    widths = dense_widths(model, arch)
    allocation.check_reachable(model, arch["input_size"], arch["num_classes"], pp.sparsity, pp.metric, pp.r_max,
                               dense, pp.round_to, table)
    dense_mrs = None
    if mrs_path is not None and pp.method == "mrpf":
        dense_mrs = read_json(mrs_path)
        check_reusable(dense_mrs, mrs_path, model, arch, splits.calibration, params)
    # distillation fine-tuning (prune.finetune_method: rslad): the dense model, frozen, is the teacher
    teacher = load_model(checkpoint, runtime)[0] if pp.finetune_method in DISTILLATION else None
    remove_stale_temporaries(run_dir)
    steps = completed_steps(run_dir, params)
    if steps:   # resume after the last completed step: its fine-tuned, pruned model
        model, state = load_model(run_dir / f"step{len(steps)}" / "checkpoint.pt", runtime)
        arch = dict(state["arch"])
        log(f"resuming {run_dir.name} after step {len(steps)}/{pp.steps}")
    for t in range(len(steps) + 1, pp.steps + 1):
        budget = pp.sparsity * t / pp.steps
        log(f"step {t}/{pp.steps}: {pp.method} to {budget:.1%} {pp.metric} reduction")
        record, history = prune_step(model, arch, params, splits, runtime, budget, dense, log, step=t,
                                     widths=widths, dense_mrs=dense_mrs if t == 1 else None, table=table,
                                     meter=meter, tune=candidate_tuner(params, splits.train, splits.spec, runtime,
                                                                        teacher, t), teacher=teacher, run_dir=run_dir)
        arch["pruning_history"] = arch["pruning_history"] + history
        epochs = pp.finetune_epochs + (pp.final_epochs if t == pp.steps else 0)
        record["finetune"] = train(finetune_params(params, epochs), run_dir / f"step{t}", log, model=model, arch=arch,
                                   teacher=teacher)
        # written after the step's checkpoint, so it marks the step complete
        write_json(run_dir / f"step{t}" / STEP_FILE, {"resume_key": _resume_key(params), "record": record})
        steps.append(record)
        log(f"step {t}: achieved {record['achieved']:.1%}, val PGD {record['finetune'].get('val_pgd_acc')}")
        if stopping.requested():   # SIGTERM during the step's last batches or its validation
            raise stopping.Stopped(f"stopped by SIGTERM after step {t}/{pp.steps}; the same command resumes there")
    summary = {"method": pp.method, "sparsity": pp.sparsity, "metric": pp.metric, "dense": dense,
               "counts": steps[-1]["counts"], "achieved": steps[-1]["achieved"],
               "widths": final_widths(model, arch, widths), "steps": steps}
    if table is not None:   # the table's prediction against the pruned model's measured time
        timed = [latency_ms(m.eval(), arch["input_size"], runtime, table.batch, params.evaluate.latency_repeats)
                 for m in (meter.dense, model)]
        summary["measured_latency_ms"] = {"dense": timed[0], "pruned": timed[1], "batch": table.batch}
        summary["measured_achieved"] = 1 - timed[1] / timed[0]
        log(f"latency: predicted {summary['achieved']:.1%} reduction, measured {summary['measured_achieved']:.1%} "
            f"({timed[0]:.2f} -> {timed[1]:.2f} ms at batch {table.batch})")
    save_checkpoint(run_dir / "checkpoint.pt", arch, model.state_dict(), params=params.to_dict())
    write_json(run_dir / "prune.json", summary)
    for t in range(1, pp.steps + 1):     # done: like training's last.pt, the resume markers go
        (run_dir / f"step{t}" / STEP_FILE).unlink(missing_ok=True)
    return summary
