"""Figures of the knowledge-neuron results. Every function returns the written path.

Figures are drawn on matplotlib's Agg canvas directly, never through pyplot, so importing this module in a
notebook leaves the notebook's own backend alone.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from analysis.overlap import jaccard
from analysis.stage import ModelResult

ARCHITECTURES = {"gpt2": "GPT-2", "gpt_neox": "GPT-NeoX", "mamba": "Mamba", "mamba2": "Mamba-2",
                 "falcon_mamba": "Falcon-Mamba"}  # config.model_type -> the name titles use


def named(label: str, architecture: str) -> str:
    """How titles and caveats name a model: its label as given and its architecture, 'pythia (GPT-NeoX)'."""
    return f"{label} ({ARCHITECTURES.get(architecture, architecture)})"


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


def fitted(fig: Figure, text: str, fontsize: float = 10) -> str:
    """`text` with each line wrapped to the figure's width, so that a long title or caveat is never clipped."""
    chars = max(20, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))  # an average glyph is about 0.6 em wide
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


def title(fig: Figure, text: str, fontsize: float = 10) -> None:
    """The figure's title, wrapped to its width."""
    fig.suptitle(fitted(fig, text, fontsize), fontsize=fontsize)


def _caveat(fig: Figure, caveat: str | None) -> None:
    """A figure-wide line (e.g. that the models are the tiny demo models) above the panels."""
    if caveat:
        title(fig, caveat)


def plot_layer_distribution(results: dict[str, ModelResult], path: Path, caveat: str | None = None) -> Path:
    """Knowledge neurons per layer, one column per model (keyed by its label): the count summed over facts (each
    model on its own axis), and below it the share that models of different widths can be compared by (one
    axis for all): knowledge neurons per fact as a percentage of the layer's neurons."""
    fig = new_figure(max(6.0, 5.5 * len(results)), 7.0)
    axes = fig.subplots(2, len(results), squeeze=False)
    top = max((max(r.layer_distribution) / (len(r.facts) * r.width) for r in results.values()), default=0) * 100
    for column, (label, res) in enumerate(results.items()):
        layers = np.arange(res.n_layers)
        count_ax, share_ax = axes[0][column], axes[1][column]
        count_ax.bar(layers, res.layer_distribution, color="tab:blue")
        count_ax.set_title(f"{named(label, res.architecture)}: knowledge neurons per layer\n({len(res.facts)} facts, "
                           f"{res.width} neurons a layer)", fontsize=10)
        count_ax.set_ylabel("count, summed over facts")
        share = 100 * np.asarray(res.layer_distribution, dtype=float) / (len(res.facts) * res.width)
        share_ax.bar(layers, share, color="tab:green")
        share_ax.set_ylim(0, top * 1.1 if top > 0 else 1)
        share_ax.set_title("per fact, as a share of the layer's neurons (same axis for all models)", fontsize=9)
        share_ax.set_ylabel("% of the layer's neurons, per fact")
        for ax in (count_ax, share_ax):
            ax.set_xlabel("layer")
            ax.set_xticks(np.arange(0, res.n_layers, max(1, res.n_layers // 12)))
    _caveat(fig, caveat)
    return save(fig, path)


def jaccard_matrix(result: ModelResult) -> tuple[list[str], np.ndarray]:
    """(fact ids grouped by relation, (n, n) Jaccard similarity of their refined neuron sets with NaN on the
    diagonal and where both sets are empty)."""
    order = sorted(result.facts, key=lambda r: r.fact.relation)  # stable: keeps table order within a relation
    sets = result.neuron_sets()
    ids = [r.fact.id for r in order]
    n = len(ids)
    matrix = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(n):
            value = jaccard(sets[ids[i]], sets[ids[j]])
            matrix[i, j] = np.nan if value is None or i == j else value
    return ids, matrix


def jaccard_scale(results: Iterable[ModelResult]) -> float:
    """One colour maximum for the Jaccard figures of several models: the largest off-diagonal value of all."""
    tops = [np.nanmax(m) for m in (jaccard_matrix(r)[1] for r in results) if np.isfinite(m).any()]
    top = max(tops, default=0.0)
    return float(top) if top > 0 else 1.0


def plot_jaccard_matrix(result: ModelResult, label: str, path: Path, caveat: str | None = None,
                        vmax: float | None = None) -> Path:
    """Fact x fact Jaccard similarity of refined neuron sets, facts grouped by relation.

    The diagonal (a fact with itself, 1 by definition) is greyed and left out of the colour scale, which runs
    from 0 to `vmax` (pass `jaccard_scale` of all models, so that colours compare across models; default: this
    model's largest off-diagonal value), stated in the title.
    """
    ids, matrix = jaccard_matrix(result)
    n = len(ids)
    top = vmax if vmax is not None else jaccard_scale([result])
    fig = new_figure(max(7.5, 0.28 * n + 5.0), max(6.0, 0.28 * n + 4.0))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=0, vmax=top)
    for k in range(n):
        ax.add_patch(Rectangle((k - 0.5, k - 0.5), 1, 1, color="0.6", lw=0))
    ax.set_xticks(range(n), ids, rotation=90, fontsize=7)
    ax.set_yticks(range(n), ids, fontsize=7)
    relations = [r.fact.relation for r in sorted(result.facts, key=lambda r: r.fact.relation)]
    for k in range(1, n):
        if relations[k] != relations[k - 1]:
            ax.axhline(k - 0.5, color="black", lw=1)
            ax.axvline(k - 0.5, color="black", lw=1)
    ax.set_xlabel("fact (grouped by relation)")
    ax.set_ylabel("fact (grouped by relation)")
    scale = "the same for every model" if vmax is not None else "this model's largest off-diagonal value"
    ax.set_title(f"colour scale 0 to {top:.3g} ({scale}); grey diagonal: a fact with itself,\nleft out of the "
                 "scale; white: both sets empty", fontsize=9)
    fig.colorbar(im, ax=ax, label="Jaccard similarity", shrink=0.8)
    heading = f"{named(label, result.architecture)}: Jaccard similarity of refined knowledge neurons"
    title(fig, f"{heading}\n{caveat}" if caveat else heading)
    return save(fig, path)


FACT_MATRIX_MAX_FACTS = 100  # above this many facts the Jaccard figure is relation x relation
MAX_PIXELS = 4000  # a side, at the dpi of `save`


def plot_relation_jaccard(result: ModelResult, label: str, path: Path, caveat: str | None = None) -> Path:
    """Relation x relation mean Jaccard of refined neuron sets (`overlap.relation_matrix`): cell (r, s) is the mean
    over every pair of a fact of r and a fact of s (the diagonal: pairs within r) whose Jaccard is defined.

    The colour scale runs from 0 to the largest cell; white: no defined pair. At most MAX_PIXELS a side.
    """
    matrix = result.overlap["relation_matrix"]
    names = matrix["relations"]
    values = np.array([[np.nan if v is None else v for v in row] for row in matrix["jaccard"]], dtype=float)
    n = len(names)
    side = min(0.3 * n + 3.5, MAX_PIXELS / 110 - 0.1)
    fig = new_figure(side, min(side - 0.7, MAX_PIXELS / 110 - 0.1))
    ax = fig.subplots()
    top = np.nanmax(values) if np.isfinite(values).any() else 0.0
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=top if top > 0 else 1.0)
    fontsize = max(3, min(8, 400 / max(n, 1)))
    ax.set_xticks(range(n), names, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n), names, fontsize=fontsize)
    ax.set_xlabel("relation")
    ax.set_ylabel("relation")
    ax.set_title(f"{label}: mean Jaccard similarity of refined knowledge neurons between relations\n"
                 f"({len(result.facts)} facts; diagonal: pairs within a relation; white: no defined pair)",
                 fontsize=10)
    fig.colorbar(im, ax=ax, label="mean Jaccard over the pairs of facts", shrink=0.8)
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


def value_labels(ax, x: np.ndarray, heights: np.ndarray, errors: np.ndarray | None = None) -> None:
    """Each bar's value written past the end of its error bar (above a positive bar, below a negative one),
    so that no label sits on a whisker and a bar too small to see still shows its value."""
    errors = np.zeros_like(heights) if errors is None else np.nan_to_num(errors)
    for xi, h, e in zip(x, heights, errors, strict=True):
        if np.isnan(h):
            continue
        up = h >= 0
        ax.annotate(f"{h:.3g}", (xi, h + e if up else h - e), xytext=(0, 3 if up else -3),
                    textcoords="offset points", ha="center", va="bottom" if up else "top", rotation=90, fontsize=7)


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
            where = x + (k - (len(summaries) - 1) / 2) * width
            ax.bar(where, heights, width, yerr=errors, capsize=2, label=label)
            value_labels(ax, where, heights, errors)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(x, [name for _, _, name in CONTROLS], rotation=20, ha="right")
        ax.set_ylabel(f"{ylabel}\n{ERROR_BARS}", fontsize=9)
        ax.set_xlabel("intervention (own fact unless stated)")
        ax.margins(y=0.2)
        ax.legend(fontsize=8)
    axes[0].set_title("Change of P(answer)", fontsize=10)
    axes[1].set_title("Top-1 prediction changed", fontsize=10)
    heading = "Suppressing (x0) / amplifying (x2) knowledge neurons vs random neurons from the same layers"
    title(fig, f"{heading}\n{caveat}" if caveat else heading)
    return save(fig, path)
