"""Figures and tables for people: the MRS bar chart and ``mrpf report``.

``mrpf report`` reads every run of the active grid (eval.json, eval_per_image.npz,
prune.json under ``results/``) and writes ``reports/summary.md`` (per dataset x
architecture x training method: every run; runs that differ only in their fine-tuning
seed as mean ± sd with seeds x images intervals; the channels each group kept; the
fine-tuning-length curve where the grid has one), ``reports/robustness.csv`` (one row per
run, for ``dvc plots``) and ``reports/robustness.png`` (PGD accuracy vs sparsity per method
with intervals).
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import numpy as np

from .io import atomic_path, read_json

ATTACKS = [("clean", "clean"), ("fgsm", "FGSM"), ("pgd", "PGD-20"), ("cw", "CW"), ("autoattack", "AA")]
BASELINE = "uniform_l1"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_mrs(mrs: dict, ratios: dict[float, list[float]] | None, path: str | Path, title: str = "") -> None:
    """Bar chart of MRS per group and, below it, the pruning ratio allocated at each sparsity
    (``ratios``: sparsity -> one ratio per group), as a PNG."""
    plt = _pyplot()
    rows = mrs["groups"]
    labels = [f"{r['id']}: {r['root'].removeprefix('net.')}" for r in rows]
    panels = 2 if ratios is not None else 1
    fig, axes = plt.subplots(panels, 1, figsize=(max(6, 0.35 * len(rows) + 2), 3.2 * panels), squeeze=False)
    axes[0][0].bar(range(len(rows)), [r["mrs"] for r in rows], color="tab:red")
    axes[0][0].set_ylabel("MRS (relative robust-loss rise)")
    axes[0][0].set_title(title or "Module Robustness Sensitivity per group")
    if ratios is not None:
        width = 0.8 / max(1, len(ratios))
        for k, (sparsity, values) in enumerate(sorted(ratios.items())):
            axes[1][0].bar([i + (k - (len(ratios) - 1) / 2) * width for i in range(len(rows))], values, width,
                           label=f"{sparsity:.0%} removed")
        axes[1][0].set_ylabel("allocated pruning ratio")
        axes[1][0].set_ylim(0, 1)
        axes[1][0].legend(fontsize=7)
    for ax in (a[0] for a in axes):
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=70, ha="right", fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _prune_record(folder: Path) -> dict | None:
    """A pruned run's prune.json (read once per run; None where the run has none yet)."""
    path = folder / "prune.json"
    return read_json(path) if path.is_file() else None


def _finetune_epochs(record: dict | None) -> int | None:
    """Fine-tuning epochs a pruned run had in all (prune.json's steps)."""
    if record is None:
        return None
    return sum(int(step.get("finetune", {}).get("epochs", 0)) for step in record.get("steps", []))


def _latency_budget(record: dict | None) -> dict:
    """A latency-budgeted run's reductions (prune.json): predicted by the latency table and
    measured on the dense and pruned models back to back (docs/method.md)."""
    record = record or {}
    if record.get("metric") != "latency" or "measured_achieved" not in record:
        return {}
    return {"latency_predicted": record["achieved"], "latency_measured": record["measured_achieved"],
            "latency_batch": record["measured_latency_ms"]["batch"]}


def _costs(folder: Path, record: dict | None) -> dict:
    """Seconds of a run: the dense model's training (train_metrics.json); a pruned run's
    scoring (MRS, curves, scores and budget solve) and fine-tuning over all steps (prune.json)."""
    if (folder / "train_metrics.json").is_file():
        return {"train_seconds": read_json(folder / "train_metrics.json").get("train_seconds")}
    if record is None:
        return {}
    steps = record.get("steps", [])
    return {"scoring_seconds": sum(s.get("scoring_seconds", 0.0) for s in steps),
            "finetune_seconds": sum(s.get("finetune", {}).get("train_seconds", 0.0) for s in steps)}


def _widths(record: dict | None) -> list[tuple[str, int, int]]:
    """Each pruning group's (root layer, channels kept, dense channels) at the end of a pruned
    run, in layer order (prune.json): the allocation the run ended with."""
    return [(root, kept, dense) for root, kept, dense in (record or {}).get("widths") or []]


def _search(record: dict | None) -> list[list[dict]]:
    """Per pruning step, the candidates of ``prune.allocation: joint_search`` (strength, robust
    loss after adaptive BN; prune.json), empty for the other runs."""
    return [step["search"] for step in (record or {}).get("steps", []) if step.get("search")]


def collect(config: dict, results: str | Path, log=print) -> list[dict]:
    """One row per evaluated model of the active grid (dense first): its metrics, its
    per-image outcomes (``outcomes``, not written out) and, for pruned runs, the paired
    PGD-20 difference to ``uniform_l1`` at the same sparsity, seed and block."""
    from . import workflow
    from .statistics import seed_image_difference

    results = Path(results)
    _, grid = workflow.active_grid(config)
    runs = workflow.pruned_runs(grid)
    baseline_of = workflow.baseline_tags(grid)
    control = workflow.control_tag(grid)
    rows = []
    for cell in workflow.cells(config):
        table = []
        dense_macs = None
        for run in [None] + runs:
            name = "dense" if run is None else run.name
            folder = results / cell["dataset"] / cell["arch"] / cell["tm"] / name
            record = None if run is None else _prune_record(folder)
            row = dict(cell, run=name, method="dense" if run is None else run.pm,
                       sparsity=0.0 if run is None else float(run.sparsity),
                       seed=None if run is None else run.seed, tag=None if run is None else run.tag,
                       finetune_epochs=_finetune_epochs(record), outcomes={},
                       overrides=() if run is None else run.overrides,
                       widths=_widths(record), search=_search(record), **_costs(folder, record))
            table.append(row)
            if not (folder / "eval.json").is_file():
                log(f"report: no {folder / 'eval.json'} yet; row left empty")
                continue
            metrics = read_json(folder / "eval.json")
            row.update({f"{a}_acc": metrics.get(f"{a}_acc") for a, _ in ATTACKS}, params=metrics["params"],
                       macs=metrics["macs"], pgd_steps=metrics.get("pgd_steps"))
            row.update(**_latency_budget(record), latency_ms=metrics.get("latency_ms"))
            if run is None:
                dense_macs = metrics["macs"]
            row["reduction"] = 1 - metrics["macs"] / dense_macs if dense_macs else None
            if (folder / "eval_per_image.npz").is_file():
                with np.load(folder / "eval_per_image.npz") as npz:
                    row["outcomes"] = {k: npz[k] for k in npz.files}
        by_key = {(r["method"], r["sparsity"], r["seed"], r["tag"]): r for r in table}
        train_seconds = table[0].get("train_seconds")
        for row in table:
            row["baseline_tag"] = baseline_of.get(row["tag"])
            row["control_tag"] = control if row["tag"] is None and row["method"] != "dense" else None
            if train_seconds and row.get("scoring_seconds") is not None:
                row["scoring_share"] = row["scoring_seconds"] / train_seconds
            if row.get("finetune_seconds") and row.get("scoring_seconds") is not None:
                # a ratio of two timings of one job: comparable across machines of different speed
                row["scoring_per_finetune"] = row["scoring_seconds"] / row["finetune_seconds"]
            base = by_key.get((BASELINE, row["sparsity"], row["seed"], row["baseline_tag"]))
            if row["method"] not in ("dense", BASELINE) and base is not None:
                mine, theirs = row["outcomes"].get("pgd"), base["outcomes"].get("pgd")
                if mine is not None and theirs is not None:
                    row["delta_pgd"] = seed_image_difference(mine[None, :], theirs[None, :])
        rows += table
    return rows


def seed_groups(rows: list[dict]) -> list[dict]:
    """Pruned runs that differ only in their fine-tuning seed, as one row each: mean and sd
    of every accuracy over the seeds, and each difference to ``uniform_l1`` (same sparsity,
    block and seeds) with its seeds x images 95 % interval (``seed_image_difference``)."""
    from .statistics import seed_image_difference, spread

    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["method"] != "dense" and row["outcomes"]:
            key = (row["dataset"], row["arch"], row["tm"], row["method"], row["sparsity"], row["tag"])
            groups.setdefault(key, []).append(row)
    out = []
    for (dataset, arch, tm, method, sparsity, tag), members in groups.items():
        group = dict(dataset=dataset, arch=arch, tm=tm, method=method, sparsity=sparsity, tag=tag,
                     baseline_tag=members[0]["baseline_tag"],
                     seeds=[m["seed"] for m in members],
                     reduction=spread([m["reduction"] for m in members if m.get("reduction") is not None]
                                      or [math.nan])["mean"])
        base = {m["seed"]: m for m in groups.get((dataset, arch, tm, BASELINE, sparsity,
                                                   members[0]["baseline_tag"]), [])}
        main = {m["seed"]: m for m in groups.get((dataset, arch, tm, method, sparsity, None), [])} if tag else {}
        control_of = members[0].get("control_tag")
        control = {m["seed"]: m for m in groups.get((dataset, arch, tm, BASELINE, sparsity, control_of), [])
                   } if control_of else {}
        group["control_tag"] = control_of
        # the median: one job slowed by another on the same cores must not move a timing summary
        for cost in ("scoring_share", "scoring_per_finetune"):
            values = [m[cost] for m in members if m.get(cost) is not None]
            group[cost] = float(np.median(values)) if values else math.nan
        for attack, _ in ATTACKS:
            values = [m[f"{attack}_acc"] for m in members if m.get(f"{attack}_acc") is not None]
            if values:
                group[attack] = spread(values)
            for key, others in (("delta", base if method != BASELINE else {}), ("delta_main", main),
                                ("delta_control", control)):
                paired = [(m["outcomes"][attack], others[m["seed"]]["outcomes"][attack]) for m in members
                          if attack in m["outcomes"] and attack in others.get(m["seed"], {}).get("outcomes", {})]
                if paired:
                    group[f"{key}_{attack}"] = seed_image_difference(np.stack([a for a, _ in paired]),
                                                                     np.stack([b for _, b in paired]))
        out.append(group)
    return out


def accuracy_interval(members: list[dict], attack: str = "pgd") -> dict | None:
    """Mean accuracy over seeds and images with its seeds x images 95 % interval."""
    from .statistics import seed_image_difference

    outcomes = [m["outcomes"][attack] for m in members if attack in m["outcomes"]]
    if not outcomes:
        return None
    stacked = np.stack(outcomes).astype(float)
    return seed_image_difference(stacked, np.zeros_like(stacked))


def _pct(value) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _interval(d: dict | None) -> str:
    if not d:
        return "—"
    return f"{100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"


def _mean_sd(s: dict | None) -> str:
    if not s:
        return "—"
    return f"{100 * s['mean']:.1f}" + ("" if math.isnan(s["sd"]) else f" ± {100 * s['sd']:.1f}")


def _seeds(n: int) -> str:
    return f"{n} seed" + ("s" if n > 1 else "")


def _with_seeds(d: dict | None) -> str:
    return _interval(d) + (f" ({_seeds(d['seeds'])})" if d else "")


def _block(group: dict) -> str:
    """A group's block: its tag, and the uniform_l1 runs it is compared with where those differ."""
    if not group["tag"]:
        return "—"
    if group["method"] != BASELINE and group["baseline_tag"] != group["tag"]:
        return f"{group['tag']} (vs {BASELINE} {group['baseline_tag'] or 'main'})"
    return group["tag"]


def _ratio(value) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.2f}"


def _seconds(value) -> str:
    return "—" if value is None else f"{value:.0f}"


def _table(out: io.StringIO, headers: list[str], body: list[list[str]]) -> None:
    from tabulate import tabulate

    out.write(tabulate(body, headers=headers, tablefmt="github", disable_numparse=True) + "\n")


def summary_markdown(rows: list[dict], grid_name: str) -> str:
    out = io.StringIO()
    out.write(f"# mrpf report: grid `{grid_name}`\n\n"
              "Accuracies in % on the evaluated test images; reduction = MACs removed relative to the dense "
              "model; latency = the evaluation's median forward time of one batch (`evaluate.latency_batch`). "
              "Per run, Δ = paired difference to `uniform_l1` at the same sparsity, seed and block, with "
              "the 95 % paired t-interval over the test images. Over seeds, mean ± sd across fine-tuning seeds "
              "and Δ with the 95 % interval over seeds and test images (`seed_image_difference` in "
              "mrpf/statistics.py). Written by `mrpf report`.\n")
    groups = seed_groups(rows)
    tables: dict[tuple, list[dict]] = {}
    for row in rows:
        tables.setdefault((row["dataset"], row["arch"], row["tm"]), []).append(row)
    for panel, table in tables.items():
        pgd = f"PGD-{next((r['pgd_steps'] for r in table if r.get('pgd_steps')), 20)}"
        attacks = [(a, pgd if a == "pgd" else h) for a, h in ATTACKS if any(r.get(f"{a}_acc") is not None
                                                                            for r in table)]
        out.write(f"\n## {' · '.join(panel)}\n\n### Runs\n\n")
        headers = (["run", "method", "sparsity", "seed", "FT epochs"] + [h for _, h in attacks]
                   + ["params", "MACs", "reduction", "latency ms", f"Δ {pgd} vs {BASELINE}",
                      "scoring s (% of dense training)", "training s"])
        body = [[r["run"], r["method"], "—" if r["method"] == "dense" else f"{r['sparsity']:g}",
                 "—" if r["seed"] is None else str(r["seed"]),
                 "—" if r["finetune_epochs"] is None else str(r["finetune_epochs"])]
                + [_pct(r.get(f"{a}_acc")) for a, _ in attacks]
                + [f"{r['params'] / 1e6:.3f} M" if r.get("params") else "—",
                   f"{r['macs'] / 1e6:.1f} M" if r.get("macs") else "—",
                   _pct(r.get("reduction")) if r["method"] != "dense" else "—",
                   "—" if r.get("latency_ms") is None else f"{r['latency_ms']:.1f}",
                   "(baseline)" if r["method"] == BASELINE and r["tag"] == r.get("baseline_tag")
                   else _interval(r.get("delta_pgd")),
                   "—" if r.get("scoring_seconds") is None else
                   f"{r['scoring_seconds']:.0f} ({_pct(r.get('scoring_share'))} %)",
                   _seconds(r.get("train_seconds", r.get("finetune_seconds")))]
                for r in table]
        _table(out, headers, body)
        mine = [g for g in groups if (g["dataset"], g["arch"], g["tm"]) == panel]
        if any(len(g["seeds"]) > 1 for g in mine):
            out.write("\n### Over fine-tuning seeds\n\n")
            tagged = any(g["tag"] for g in mine)
            control = next((g["control_tag"] for g in mine if g.get("control_tag")), None)
            headers = (["method", "sparsity", "block", "seeds"] + [f"{h} mean ± sd" for _, h in attacks]
                       + [f"Δ {h} vs {BASELINE} [95 % CI]" for _, h in attacks]
                       + ([f"Δ {h} vs {BASELINE} {control}" for _, h in attacks] if control else [])
                       + ([f"Δ {h} vs the method's main runs" for _, h in attacks] if tagged else [])
                       + ["scoring / own fine-tuning time (median)", "scoring % of dense training (median)"])
            body = [[g["method"], f"{g['sparsity']:g}", _block(g), ",".join(str(s) for s in g["seeds"])]
                    + [_mean_sd(g.get(a)) for a, _ in attacks]
                    + ["(baseline)" if g["method"] == BASELINE else _with_seeds(g.get(f"delta_{a}"))
                       for a, _ in attacks]
                    + ([_with_seeds(g.get(f"delta_control_{a}")) for a, _ in attacks] if control else [])
                    + ([_with_seeds(g.get(f"delta_main_{a}")) for a, _ in attacks] if tagged else [])
                    + [_ratio(g.get("scoring_per_finetune")), _pct(g.get("scoring_share"))]
                    for g in sorted(mine, key=lambda g: (g["tag"] or "", g["sparsity"], g["method"] != BASELINE,
                                                         g["method"]))]
            _table(out, headers, body)
        budgeted = [r for r in table if r.get("latency_measured") is not None]
        if budgeted:
            out.write("\n### Latency budgets\n\nRuns pruned to a fraction of the dense model's forward time "
                      "(`prune.metric: latency`): the reduction the latency table predicted and the one measured "
                      "on the dense and pruned models back to back at the end of the run.\n\n")
            headers = ["run", "target", "predicted", "measured", "batch", pgd, f"Δ {pgd} vs {BASELINE}"]
            body = [[r["run"], _pct(r["sparsity"]), _pct(r["latency_predicted"]), _pct(r["latency_measured"]),
                     str(r["latency_batch"]), _pct(r.get("pgd_acc")),
                     "(baseline)" if r["method"] == BASELINE else _interval(r.get("delta_pgd"))] for r in budgeted]
            _table(out, headers, body)
        _widths_table(out, table)
        _search_table(out, table)
        curve = finetune_curve(table)
        if curve:
            out.write(f"\n### Fine-tuning length (seed {curve[0]['seed']})\n\n")
            headers = ["method", "sparsity", "FT epochs"] + [h for _, h in attacks] + [f"Δ {pgd} vs {BASELINE}"]
            body = [[r["method"], f"{r['sparsity']:g}", str(r["finetune_epochs"])]
                    + [_pct(r.get(f"{a}_acc")) for a, _ in attacks]
                    + ["(baseline)" if r["method"] == BASELINE else _interval(r.get("delta_pgd"))] for r in curve]
            _table(out, headers, body)
    return out.getvalue()


def _widths_table(out: io.StringIO, table: list[dict]) -> None:
    """Channels kept / dense per pruning group (columns in layer order), for the pruned runs
    of the lowest fine-tuning seed: where each method spent the budget."""
    pruned = [r for r in table if r["widths"]]
    if not pruned:
        return
    seed = min((r["seed"] for r in pruned if r["seed"] is not None), default=None)
    shown = [r for r in pruned if r["seed"] == seed]
    roots = [root for root, _, _ in max(shown, key=lambda r: len(r["widths"]))["widths"]]
    common = os.path.commonprefix(roots)
    prefix = common[:common.rfind(".") + 1]
    out.write("\n### Channels kept per group\n\nChannels each pruning group keeps at the end of the run / its "
              "dense width; groups named by their first layer"
              + (f" (after `{prefix}`)" if prefix else "") + ", in layer order"
              + (f"; seed {seed}" if seed is not None else "") + ".\n\n")
    headers = ["run"] + [root[len(prefix):] for root in roots] + ["params"]
    body = []
    for r in shown:
        kept = {root: f"{k}/{d}" for root, k, d in r["widths"]}
        body.append([r["run"]] + [kept.get(root, "—") for root in roots]
                    + [f"{r['params'] / 1e6:.3f} M" if r.get("params") else "—"])
    _table(out, headers, body)


def _search_table(out: io.StringIO, table: list[dict]) -> None:
    """The strength ``joint_search`` chose at each pruning step, with every candidate's robust loss."""
    searched = [r for r in table if r["search"]]
    if not searched:
        return
    steps = max(len(r["search"]) for r in searched)
    out.write("\n### Strength chosen on the jointly pruned model\n\n`prune.allocation: joint_search` "
              "(docs/method.md): per pruning step the chosen strength t (0: uniform, 1: the inverse-MRS rule) "
              "and the robust loss on the calibration images of each candidate, in order of t.\n\n")
    headers = ["run"] + [f"step {t + 1}" for t in range(steps)]
    body = []
    for r in searched:
        cells = []
        for candidates in r["search"]:
            best = min(candidates, key=lambda c: c["robust_loss"])
            cells.append(f"t = {best['strength']:g} ("
                         + " / ".join(f"{c['robust_loss']:.3f}" for c in candidates) + ")")
        body.append([r["run"]] + cells + ["—"] * (steps - len(cells)))
    _table(out, headers, body)


def _beyond_length(overrides: tuple[str, ...]) -> list[str]:
    """A run's overrides other than its fine-tuning length and its evaluation."""
    return [o for o in overrides if not o.startswith(("prune.finetune_epochs=", "prune.final_epochs=", "evaluate."))]


def finetune_curve(table: list[dict]) -> list[dict]:
    """Runs of one seed that differ only in their fine-tuning epochs (at least two lengths
    of the same method and sparsity), sorted by method, sparsity and epochs."""
    evaluated = [r for r in table if r["method"] != "dense" and r.get("pgd_acc") is not None
                 and r["finetune_epochs"] is not None and not _beyond_length(r["overrides"])]
    lengths: dict[tuple, set] = {}
    for r in evaluated:
        lengths.setdefault((r["method"], r["sparsity"], r["seed"]), set()).add(r["finetune_epochs"])
    keys = {k for k, v in lengths.items() if len(v) > 1}
    if not keys:
        return []
    seed = min(k[2] for k in keys if k[2] is not None) if any(k[2] is not None for k in keys) else None
    return sorted((r for r in evaluated if (r["method"], r["sparsity"], r["seed"]) in keys and r["seed"] == seed),
                  key=lambda r: (r["sparsity"], r["method"] != BASELINE, r["method"], r["finetune_epochs"]))


def plot_robustness(rows: list[dict], path: str | Path) -> None:
    """Per dataset x arch x training method: PGD accuracy vs sparsity, one line per method
    (mean over seeds, bars = 95 % interval over seeds and images), and, where the grid
    varies the fine-tuning length, PGD accuracy vs fine-tuning epochs below it."""
    plt = _pyplot()
    panels = sorted({(r["dataset"], r["arch"], r["tm"]) for r in rows})
    curves = {panel: finetune_curve([r for r in rows if (r["dataset"], r["arch"], r["tm"]) == panel])
              for panel in panels}
    n_rows = 2 if any(curves.values()) else 1
    fig, axes = plt.subplots(n_rows, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 3.8 * n_rows),
                             squeeze=False)
    for column, panel in enumerate(panels):
        ax = axes[0][column]
        mine = [r for r in rows if (r["dataset"], r["arch"], r["tm"]) == panel and r.get("pgd_acc") is not None]
        dense = [r for r in mine if r["method"] == "dense"]
        untagged = [r for r in mine if r["method"] != "dense" and r["tag"] is None]
        for method in sorted({r["method"] for r in untagged}):
            points = []
            for sparsity in sorted({r["sparsity"] for r in untagged if r["method"] == method}):
                members = [r for r in untagged if r["method"] == method and r["sparsity"] == sparsity]
                interval = accuracy_interval(members)
                mean = 100 * float(np.mean([m["pgd_acc"] for m in members]))
                low, high = (100 * interval["low"], 100 * interval["high"]) if interval else (mean, mean)
                points.append((sparsity, mean, mean - low, high - mean))
            points = [(0.0, 100 * d["pgd_acc"], 0.0, 0.0) for d in dense] + points
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[[p[2] for p in points],
                        [p[3] for p in points]], marker="o", capsize=3, label=method)
        ax.set_title(" · ".join(panel), fontsize=9)
        ax.set_xlabel("sparsity (MACs removed)")
        ax.set_ylabel("PGD accuracy (%), mean over seeds")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no evaluated runs yet", ha="center", va="center", transform=ax.transAxes)
        if n_rows == 2:
            ax = axes[1][column]
            curve = curves[panel]
            for method, sparsity in sorted({(r["method"], r["sparsity"]) for r in curve}):
                points = sorted((r["finetune_epochs"], 100 * r["pgd_acc"]) for r in curve
                                if (r["method"], r["sparsity"]) == (method, sparsity))
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{method} {sparsity:g}")
            ax.set_xlabel("fine-tuning epochs")
            ax.set_ylabel("PGD accuracy (%)")
            ax.grid(alpha=0.3)
            if curve:
                ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


CSV_FIELDS = ["dataset", "arch", "tm", "run", "method", "sparsity", "seed", "tag", "finetune_epochs", "reduction",
              "clean_acc", "fgsm_acc", "pgd_acc", "cw_acc", "autoattack_acc", "params", "macs", "delta_pgd",
              "delta_pgd_low", "delta_pgd_high"]


def write_report(config: dict, results: str | Path, out_dir: str | Path, log=print) -> list[dict]:
    """``mrpf report``: summary.md, robustness.csv and robustness.png in ``out_dir``."""
    out_dir = Path(out_dir)
    rows = collect(config, results, log)
    with atomic_path(out_dir / "summary.md") as tmp:
        tmp.write_text(summary_markdown(rows, config["grid"]))
    with atomic_path(out_dir / "robustness.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                d = row.get("delta_pgd") or {}
                writer.writerow(dict(row, delta_pgd=d.get("diff"), delta_pgd_low=d.get("low"),
                                     delta_pgd_high=d.get("high")))
    plot_robustness(rows, out_dir / "robustness.png")
    return rows
