"""What a selection run writes besides the subset: scores.csv, report.json and PNG plots.

scores.csv   one row per example: id, every raw and normalised score, final score, cluster, eligible, selected,
             and why an example was not eligible.
report.json  counts, cluster sizes and allocations, per-score statistics (all vs selected), failures, timings and
             the config used.
plots        scores.png (histogram per score, all vs selected), clusters.png (sizes and allocations),
             projection.png (2-D PCA of the image embeddings coloured by cluster, selected marked).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llava_jax.io import atomic_open


def _fmt(value: float) -> str:
    return "" if not np.isfinite(value) else f"{value:.6g}"


def write_scores_csv(
    path: str | os.PathLike,
    keys: Sequence[str],
    raw: Mapping[str, np.ndarray],
    normalised: Mapping[str, np.ndarray],
    final: np.ndarray,
    labels: np.ndarray,
    eligible: np.ndarray,
    selected: np.ndarray,
    reasons: Sequence[str],
) -> None:
    """Writes scores.csv atomically (columns: id, {name}, {name}_norm per score, final, cluster, eligible,
    selected, excluded_reason); missing values are empty cells."""
    names = list(raw)
    with atomic_open(path, "w") as f:
        writer = csv.writer(f)
        writer.writerow(["id", *names, *(f"{n}_norm" for n in names), "final", "cluster", "eligible", "selected",
                         "excluded_reason"])
        for i, key in enumerate(keys):
            writer.writerow([
                key,
                *(_fmt(raw[n][i]) for n in names),
                *(_fmt(normalised[n][i]) for n in names),
                _fmt(final[i]),
                int(labels[i]),
                int(bool(eligible[i])),
                int(bool(selected[i])),
                reasons[i],
            ])


def describe(values: np.ndarray) -> dict[str, float | int | None]:
    """count / mean / std / min / median / max of the finite values [N] (None when there are none)."""
    x = np.asarray(values, np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"count": 0, "mean": None, "std": None, "min": None, "median": None, "max": None}
    return {"count": int(x.size), "mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()),
            "median": float(np.median(x)), "max": float(x.max())}


def score_statistics(raw: Mapping[str, np.ndarray], final: np.ndarray, selected: np.ndarray) -> dict[str, Any]:
    """{score name (and "final"): {"all": describe, "selected": describe}}."""
    selected = np.asarray(selected, bool)
    columns = {**raw, "final": final}
    return {name: {"all": describe(col), "selected": describe(np.asarray(col)[selected])}
            for name, col in columns.items()}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")


def plot_score_histograms(path: str | os.PathLike, columns: Mapping[str, np.ndarray], selected: np.ndarray) -> None:
    """One histogram per score column (finite values), all examples vs the selected ones, in one PNG."""
    plt = _pyplot()
    names = list(columns)
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4 * max(1, len(names)), 3.2), squeeze=False)
    selected = np.asarray(selected, bool)
    for ax, name in zip(axes[0], names, strict=False):
        col = np.asarray(columns[name], np.float64)
        ok = np.isfinite(col)
        if ok.any():
            bins = np.histogram_bin_edges(col[ok], bins=30)
            ax.hist(col[ok], bins=bins, alpha=0.5, label=f"all ({ok.sum()})", density=True)
            if (ok & selected).any():
                ax.hist(col[ok & selected], bins=bins, alpha=0.6, label=f"selected ({(ok & selected).sum()})",
                        density=True)
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, Path(path))
    plt.close(fig)


def plot_cluster_sizes(path: str | os.PathLike, table: Mapping[int, Mapping[str, int]]) -> None:
    """Bar chart of cluster sizes with the allocated share of each cluster."""
    plt = _pyplot()
    clusters = sorted(table)
    fig, ax1 = plt.subplots(figsize=(max(4, 0.6 * len(clusters) + 2), 3.2))
    x = np.arange(len(clusters))
    ax1.bar(x - 0.2, [table[c]["size"] for c in clusters], width=0.4, label="size")
    ax1.set_xticks(x, [str(c) for c in clusters])
    ax1.set_xlabel("cluster")
    ax1.set_ylabel("examples")
    ax2 = ax1.twinx()
    ax2.bar(x + 0.2, [table[c]["allocated"] for c in clusters], width=0.4, color="tab:orange", label="allocated")
    ax2.set_ylabel("allocated")
    fig.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    _save(fig, Path(path))
    plt.close(fig)


def plot_projection(
    path: str | os.PathLike,
    embeddings: np.ndarray,
    labels: np.ndarray,
    selected: np.ndarray,
    seed: int = 0,
    max_points: int = 20000,
) -> None:
    """2-D PCA of embeddings [N, D] (rows with label >= 0; at most max_points drawn, selected always kept),
    coloured by cluster, selected examples outlined."""
    from sklearn.decomposition import PCA

    plt = _pyplot()
    labels = np.asarray(labels)
    selected = np.asarray(selected, bool)
    rows = np.flatnonzero(labels >= 0)
    rows = rows[np.abs(embeddings[rows]).sum(axis=1) > 0] if len(rows) else rows
    if len(rows) > max_points:
        rng = np.random.default_rng(seed)
        keep = rng.choice(rows, size=max_points, replace=False)
        rows = np.union1d(keep, rows[selected[rows]])
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    if len(rows) >= 2:
        xy = PCA(n_components=2, random_state=seed).fit_transform(np.asarray(embeddings[rows], np.float32))
        ax.scatter(xy[:, 0], xy[:, 1], c=labels[rows], cmap="tab10", s=6, alpha=0.6)
        mark = selected[rows]
        ax.scatter(xy[mark, 0], xy[mark, 1], facecolors="none", edgecolors="black", s=28, linewidths=0.8,
                   label=f"selected ({int(mark.sum())})")
        ax.legend(fontsize=7)
    ax.set_title("image embeddings (PCA), colour = cluster")
    fig.tight_layout()
    _save(fig, Path(path))
    plt.close(fig)
