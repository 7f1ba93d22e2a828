"""Figures and tables for people: the MRS bar chart and ``mrpf report``.

``mrpf report`` reads every run of the active grid (eval.json, eval_per_image.npz,
prune.json under ``results/``) and writes ``reports/summary.md`` (one table per dataset x
architecture x training method; rows method x sparsity), ``reports/robustness.csv``
(the same rows, for ``dvc plots``) and ``reports/robustness.png`` (PGD-20 accuracy vs
sparsity per method).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from .io import atomic_path, read_json

COLUMNS = [("clean_acc", "clean"), ("fgsm_acc", "FGSM"), ("pgd_acc", "PGD-20"), ("cw_acc", "CW"),
           ("autoattack_acc", "AA")]
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


def collect(config: dict, results: str | Path, log=print) -> list[dict]:
    """One row per evaluated model of the active grid (dense first), with the paired
    PGD-20 difference to ``uniform_l1`` at the same sparsity where both exist."""
    from . import workflow
    from .statistics import seed_image_difference

    results = Path(results)
    _, grid = workflow.active_grid(config)
    rows = []
    for cell in workflow.cells(config):
        models = [("dense", None)] + [(run.pm, run.sparsity) for run in workflow.pruned_runs(grid)]
        outcomes = {}
        dense_macs = None
        for method, sparsity in models:
            folder = results / cell["dataset"] / cell["arch"] / cell["tm"] / (method if sparsity is None else
                                                                              f"{method}-{sparsity}")
            row = dict(cell, method=method, sparsity=0.0 if sparsity is None else float(sparsity))
            if not (folder / "eval.json").is_file():
                log(f"report: no {folder / 'eval.json'} yet; row left empty")
                rows.append(row)
                continue
            metrics = read_json(folder / "eval.json")
            row.update({k: metrics.get(k) for k, _ in COLUMNS}, params=metrics["params"], macs=metrics["macs"],
                       pgd_steps=metrics.get("pgd_steps"))
            if method == "dense":
                dense_macs = metrics["macs"]
            row["reduction"] = 1 - metrics["macs"] / dense_macs if dense_macs else None
            if (folder / "eval_per_image.npz").is_file():
                with np.load(folder / "eval_per_image.npz") as npz:
                    outcomes[(method, sparsity)] = npz["pgd"] if "pgd" in npz.files else None
            rows.append(row)
        for row in rows[-len(models):]:
            key = (row["method"], None if row["method"] == "dense" else workflow.sparsity_label(row["sparsity"]))
            base = outcomes.get((BASELINE, key[1]))
            mine = outcomes.get(key)
            if key[1] is not None and base is not None and mine is not None:
                # outcomes of each seed as rows (one seed per run folder today: the paired interval)
                row["delta_pgd"] = seed_image_difference(mine[None, :], base[None, :])
    return rows


def _pct(value) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _delta(row: dict) -> str:
    if row["method"] == BASELINE:
        return "(baseline)"
    d = row.get("delta_pgd")
    if not d:
        return "—"
    return f"{100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"


def summary_markdown(rows: list[dict], grid_name: str) -> str:
    from tabulate import tabulate

    out = io.StringIO()
    out.write(f"# mrpf report: grid `{grid_name}`\n\n"
              "Accuracies in % on the evaluated test images; reduction = MACs removed relative to the dense "
              "model; Δ PGD-20 = paired difference to `uniform_l1` at the same sparsity with its 95 % "
              "confidence interval over fine-tuning seeds and test images (`seed_image_difference` in "
              "mrpf/statistics.py; with one seed, the paired t-interval over the same test images). "
              "Written by `mrpf report`.\n")
    tables: dict[tuple, list[dict]] = {}
    for row in rows:
        tables.setdefault((row["dataset"], row["arch"], row["tm"]), []).append(row)
    for (dataset, arch, tm), table in tables.items():
        pgd = f"PGD-{next((r['pgd_steps'] for r in table if r.get('pgd_steps')), 20)}"
        headers = (["method", "sparsity"] + [pgd if h == "PGD-20" else h for _, h in COLUMNS]
                   + ["params", "MACs", "reduction", f"Δ {pgd} vs {BASELINE}"])
        body = [[r["method"], "—" if r["method"] == "dense" else f"{r['sparsity']:g}"]
                + [_pct(r.get(k)) for k, _ in COLUMNS]
                + [f"{r['params'] / 1e6:.3f} M" if r.get("params") else "—",
                   f"{r['macs'] / 1e6:.1f} M" if r.get("macs") else "—",
                   _pct(r.get("reduction")) if r["method"] != "dense" else "—", _delta(r)]
                for r in table]
        out.write(f"\n## {dataset} · {arch} · {tm}\n\n")
        out.write(tabulate(body, headers=headers, tablefmt="github", disable_numparse=True))
        out.write("\n")
    return out.getvalue()


def plot_robustness(rows: list[dict], path: str | Path) -> None:
    """PGD-20 accuracy vs sparsity, one line per method, one panel per dataset x arch x method."""
    plt = _pyplot()
    panels = sorted({(r["dataset"], r["arch"], r["tm"]) for r in rows})
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        mine = [r for r in rows if (r["dataset"], r["arch"], r["tm"]) == panel and r.get("pgd_acc") is not None]
        dense = [r for r in mine if r["method"] == "dense"]
        for method in sorted({r["method"] for r in mine} - {"dense"}):
            points = sorted((r["sparsity"], 100 * r["pgd_acc"]) for r in mine + dense
                            if r["method"] in (method, "dense"))
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        ax.set_title(" · ".join(panel), fontsize=9)
        ax.set_xlabel("sparsity (MACs removed)")
        ax.set_ylabel("PGD-20 accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


CSV_FIELDS = ["dataset", "arch", "tm", "method", "sparsity", "reduction", "clean_acc", "fgsm_acc", "pgd_acc", "cw_acc",
              "autoattack_acc", "params", "macs", "delta_pgd", "delta_pgd_low", "delta_pgd_high"]


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
