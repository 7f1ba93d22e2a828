"""Figures and tables for people: the MRS bar chart (more to come with ``mrpf report``)."""

from __future__ import annotations

from pathlib import Path

from .io import atomic_path


def plot_mrs(mrs: dict, ratios: list[float] | None, path: str | Path, title: str = "") -> None:
    """Bar chart of MRS per group and, beside it, the allocated pruning ratio, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = mrs["groups"]
    labels = [f"{r['id']}: {r['root'].removeprefix('net.')}" for r in rows]
    panels = 2 if ratios is not None else 1
    fig, axes = plt.subplots(panels, 1, figsize=(max(6, 0.35 * len(rows) + 2), 3.2 * panels), squeeze=False)
    axes[0][0].bar(range(len(rows)), [r["mrs"] for r in rows], color="tab:red")
    axes[0][0].set_ylabel("MRS (relative robust-loss rise)")
    axes[0][0].set_title(title or "Module Robustness Sensitivity per group")
    if ratios is not None:
        axes[1][0].bar(range(len(rows)), ratios, color="tab:blue")
        axes[1][0].set_ylabel("allocated pruning ratio")
        axes[1][0].set_ylim(0, 1)
    for ax in (a[0] for a in axes):
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=70, ha="right", fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
