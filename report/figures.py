"""Figures of the knowledge-neuron results. Every function returns the written path.

Figures are drawn on matplotlib's Agg canvas directly, never through pyplot, so importing this module in a
notebook leaves the notebook's own backend alone.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from analysis.overlap import jaccard
from analysis.stage import ModelResult


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


def _caveat(fig: Figure, caveat: str | None) -> None:
    """A figure-wide line (e.g. that the models are the tiny demo models) above the panels."""
    if caveat:
        fig.suptitle(caveat, fontsize=10)


def plot_layer_distribution(results: dict[str, ModelResult], path: Path, caveat: str | None = None) -> Path:
    """Knowledge neurons per layer, one panel per model (keyed by its label)."""
    fig = new_figure(5.5 * len(results), 3.8)
    axes = fig.subplots(1, len(results), squeeze=False)
    for ax, (label, res) in zip(axes[0], results.items(), strict=True):
        ax.bar(np.arange(res.n_layers), res.layer_distribution, color="tab:blue")
        ax.set_title(f"{label}: knowledge neurons per layer ({len(res.facts)} facts)")
        ax.set_xlabel("layer")
        ax.set_ylabel("knowledge neurons (count, summed over facts)")
        ax.set_xticks(np.arange(0, res.n_layers, max(1, res.n_layers // 12)))
    _caveat(fig, caveat)
    return save(fig, path)


def plot_jaccard_matrix(result: ModelResult, label: str, path: Path, caveat: str | None = None) -> Path:
    """Fact x fact Jaccard similarity of refined neuron sets, facts grouped by relation.

    The diagonal (a fact with itself, 1 by definition) is greyed and left out of the colour scale, which runs
    from 0 to the largest off-diagonal value so that the structure between facts stays visible.
    """
    order = sorted(result.facts, key=lambda r: r.fact.relation)  # stable: keeps table order within a relation
    sets = result.neuron_sets()
    ids = [r.fact.id for r in order]
    n = len(ids)
    matrix = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(n):
            value = jaccard(sets[ids[i]], sets[ids[j]])
            matrix[i, j] = np.nan if value is None or i == j else value
    top = np.nanmax(matrix) if np.isfinite(matrix).any() else 0.0
    top = top if top > 0 else 1.0
    fig = new_figure(0.28 * n + 3.5, 0.28 * n + 2.8)
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=0, vmax=top)
    for k in range(n):
        ax.add_patch(Rectangle((k - 0.5, k - 0.5), 1, 1, color="0.6", lw=0))
    ax.set_xticks(range(n), ids, rotation=90, fontsize=7)
    ax.set_yticks(range(n), ids, fontsize=7)
    relations = [r.fact.relation for r in order]
    for k in range(1, n):
        if relations[k] != relations[k - 1]:
            ax.axhline(k - 0.5, color="black", lw=1)
            ax.axvline(k - 0.5, color="black", lw=1)
    ax.set_xlabel("fact (grouped by relation)")
    ax.set_ylabel("fact (grouped by relation)")
    ax.set_title(f"{label}: Jaccard similarity of refined knowledge neurons\n(grey diagonal: a fact with itself, "
                 "left out of the colour scale; white: both sets empty)", fontsize=10)
    fig.colorbar(im, ax=ax, label=f"Jaccard similarity (scale 0 to the largest off-diagonal value, {top:.3g})",
                 shrink=0.8)
    _caveat(fig, caveat)
    return save(fig, path)


CONTROLS = [
    ("suppress", "knowledge_neurons", "KN x0"),
    ("suppress", "random_neurons", "random x0"),
    ("suppress", "same_relation_facts", "KN x0 on same-relation facts"),
    ("suppress", "other_relation_facts", "KN x0 on other-relation facts"),
    ("amplify", "knowledge_neurons", "KN x2"),
    ("amplify", "random_neurons", "random x2"),
]
ERROR_BARS = "error bars: ±1 standard error of the mean over facts"


def _percent(values: list[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else 100 * v for v in values])


def plot_interventions(summaries: dict[str, dict], path: Path, caveat: str | None = None) -> Path:
    """Mean relative change of P(answer) and flip rate for knowledge neurons vs controls, per model, with
    standard errors over facts; every bar carries its value so that small effects (random neurons) stay readable."""
    fig = new_figure(13, 4.8)
    axes = fig.subplots(1, 2)
    width = 0.8 / len(summaries)
    x = np.arange(len(CONTROLS))
    panels = [("relative_change_mean", "relative_change_sem", "mean relative change of P(answer) (%)"),
              ("flip_rate", "flip_rate_sem", "top-1 flip rate (% of prompts)")]
    for ax, (mean, sem, ylabel) in zip(axes, panels, strict=True):
        for k, (label, summary) in enumerate(summaries.items()):
            cells = [summary[op][ctrl] for op, ctrl, _ in CONTROLS]
            heights, errors = _percent([c[mean] for c in cells]), _percent([c[sem] for c in cells])
            bars = ax.bar(x + (k - (len(summaries) - 1) / 2) * width, heights, width, yerr=errors, capsize=2,
                          label=label)
            ax.bar_label(bars, labels=["" if np.isnan(h) else f"{h:.3g}" for h in heights], fontsize=7,
                         padding=3, rotation=90)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(x, [name for _, _, name in CONTROLS], rotation=20, ha="right")
        ax.set_ylabel(f"{ylabel}\n{ERROR_BARS}", fontsize=9)
        ax.set_xlabel("intervention (own fact unless stated)")
        ax.margins(y=0.2)
        ax.legend(fontsize=8)
    axes[0].set_title("Change of P(answer)", fontsize=10)
    axes[1].set_title("Top-1 prediction changed", fontsize=10)
    title = "Suppressing (x0) / amplifying (x2) knowledge neurons vs random neurons from the same layers"
    fig.suptitle(f"{title}\n{caveat}" if caveat else title, fontsize=10)
    return save(fig, path)
