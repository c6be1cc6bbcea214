"""Artifacts people would rather look at than read."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display here or on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_figure(fig, path: Path, dpi: int = 100) -> Path:
    """Every figure of ours ends here: laid out, written, and closed (pyplot keeps every
    open figure alive; a sweep or a suite makes many)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def confusion_matrix(targets: list[int], preds: list[int], classnames: list[str], path: Path, title: str) -> Path:
    n = len(classnames)
    counts = np.zeros((n, n), dtype=int)
    for t, p in zip(targets, preds):
        counts[t, p] += 1
    rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1 + 0.5 * n, 1 + 0.5 * n))
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classnames, rotation=90)
    ax.set_yticks(range(n), classnames)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title} (row-normalized)")
    for i in range(n):
        for j in range(n):
            if counts[i, j]:
                ax.text(j, i, counts[i, j], ha="center", va="center", fontsize=7,
                        color="white" if rows[i, j] > 0.5 else "black")
    return save_figure(fig, path)


def bar_chart(results: list[dict], path: Path, title: str = "results by dataset") -> Path:
    """One bar per (task, dataset): its headline metric (a record's own `metric` when it
    names one; accuracy in %, or RSUM)."""
    from eval.runner import HEADLINE  # evaluation's own table: pyplot alone for compare and the sweeps
    labels, values = [], []
    for r in results:
        key = r.get("metric") or HEADLINE[r["task"]]
        value = r["metrics"][key]
        labels.append(f"{r['task'].replace('zeroshot_', 'zs ')}\n{r['dataset']}")
        values.append(value if key == "rsum" else 100 * value)
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(values)), 4))
    bars = ax.bar(range(len(values)), values, color="tab:blue")
    ax.bar_label(bars, fmt="%.1f")
    ax.set_xticks(range(len(values)), labels, fontsize=8)
    ax.set_ylabel("top-1 % (classification) / RSUM (retrieval)")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def error_bars(labels: list[str], panels: dict[str, tuple[list, list]], path: Path) -> Path:
    """One panel per metric: each label's mean as a bar, its std as the error bar (a
    sweep's variants over seeds, eval.compare's groups of runs). Labels without a mean
    in a panel are left out of it."""
    fig, axes = plt.subplots(1, len(panels), figsize=((2 + 0.5 * len(labels)) * len(panels), 3.8), squeeze=False)
    for ax, (metric, (means, stds)) in zip(axes[0], panels.items()):
        shown = [i for i, m in enumerate(means) if m is not None]
        ax.bar(range(len(shown)), [means[i] for i in shown], yerr=[stds[i] or 0 for i in shown], capsize=3)
        ax.set_xticks(range(len(shown)), [labels[i] for i in shown], rotation=45, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path, dpi=110)
