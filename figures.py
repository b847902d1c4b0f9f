"""Figures of the knowledge-neuron results. Every function returns the written path.

Figures are drawn on matplotlib's Agg canvas directly, never through pyplot, so importing this module in a
notebook leaves the notebook's own backend alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis import ModelResult
from statistics_kn import jaccard


def new_figure(width: float, height: float) -> Figure:
    """A headless figure of width x height inches."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str | Path) -> Path:
    """Write a figure as PNG (creating its folder) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_layer_distribution(results: dict[str, ModelResult], path: Path) -> Path:
    """Knowledge neurons per layer, one panel per model."""
    fig = new_figure(5.5 * len(results), 3.6)
    axes = fig.subplots(1, len(results), squeeze=False)
    for ax, (label, res) in zip(axes[0], results.items(), strict=True):
        ax.bar(np.arange(res.n_layers), res.layer_distribution, color="tab:blue")
        ax.set_title(f"{label}: knowledge neurons per layer\n({Path(res.name).name}, {len(res.facts)} facts)")
        ax.set_xlabel("layer")
        ax.set_ylabel("knowledge neurons (count, summed over facts)")
        ax.set_xticks(np.arange(0, res.n_layers, max(1, res.n_layers // 12)))
    return save(fig, path)


def plot_jaccard_matrix(result: ModelResult, label: str, path: Path) -> Path:
    """Fact x fact Jaccard similarity of refined neuron sets, facts grouped by relation."""
    order = sorted(result.facts, key=lambda r: r.fact.relation)  # stable: keeps table order within a relation
    sets = result.neuron_sets()
    ids = [r.fact.id for r in order]
    n = len(ids)
    matrix = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(n):
            value = jaccard(sets[ids[i]], sets[ids[j]])
            matrix[i, j] = np.nan if value is None else value
    fig = new_figure(0.28 * n + 3.5, 0.28 * n + 2.5)
    ax = fig.subplots()
    im = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(n), ids, rotation=90, fontsize=7)
    ax.set_yticks(range(n), ids, fontsize=7)
    relations = [r.fact.relation for r in order]
    for k in range(1, n):
        if relations[k] != relations[k - 1]:
            ax.axhline(k - 0.5, color="white", lw=1)
            ax.axvline(k - 0.5, color="white", lw=1)
    ax.set_xlabel("fact (grouped by relation)")
    ax.set_ylabel("fact (grouped by relation)")
    ax.set_title(f"{label}: Jaccard similarity of refined knowledge neurons\n(blank: both sets empty)")
    fig.colorbar(im, ax=ax, label="Jaccard similarity (0-1)", shrink=0.8)
    return save(fig, path)


CONTROLS = [
    ("suppress", "knowledge_neurons", "KN x0"),
    ("suppress", "random_neurons", "random x0"),
    ("suppress", "same_relation_facts", "KN x0 on same-relation facts"),
    ("suppress", "other_relation_facts", "KN x0 on other-relation facts"),
    ("amplify", "knowledge_neurons", "KN x2"),
    ("amplify", "random_neurons", "random x2"),
]


def plot_interventions(summaries: dict[str, dict], path: Path) -> Path:
    """Mean relative change of P(answer) for knowledge neurons vs controls, per model."""
    fig = new_figure(9, 4)
    ax = fig.subplots()
    width = 0.8 / len(summaries)
    x = np.arange(len(CONTROLS))
    for k, (label, summary) in enumerate(summaries.items()):
        values = [summary[op][ctrl]["relative_change_mean"] for op, ctrl, _ in CONTROLS]
        heights = [100 * v if v is not None else np.nan for v in values]
        ax.bar(x + (k - (len(summaries) - 1) / 2) * width, heights, width, label=label)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, [name for _, _, name in CONTROLS], rotation=20, ha="right")
    ax.set_ylabel("mean relative change of P(answer) (%)")
    ax.set_xlabel("intervention (own fact unless stated)")
    ax.set_title("Suppressing / amplifying knowledge neurons vs random neurons from the same layers")
    ax.legend()
    return save(fig, path)
