"""Causal-tracing figures: ROME-style heatmaps (layer x token) of single facts, and the average indirect effect of
ROME's six token groups over layers, one column a model."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator

from causal_tracing import SITES
from report.figures import _caveat, new_figure, save

SITE_TITLES = {"residual": "block output (residual stream)", "kn_site": "knowledge-neuron projection output",
               "token_mixing": "token-mixing output (attention / SSM y)"}
GROUP_TITLES = {"first_subject": "first subject token", "middle_subject": "middle subject tokens",
                "last_subject": "last subject token", "first_after": "first token after the subject",
                "further": "further tokens", "last": "last token"}


def plot_trace_heatmaps(traced: dict, label: str, folder: Path, prefix: str, n_facts: int,
                        caveat: str | None = None) -> list[Path]:
    """One figure per fact (the first n_facts): P(answer) after restoring each (layer, token), the three sites
    side by side; subject tokens marked with '*'."""
    paths = []
    for record in traced["facts"][:n_facts]:
        tokens = [repr(t)[1:-1] + ("*" if i in record["subject_positions"] else "")
                  for i, t in enumerate(record["tokens"])]
        fig = new_figure(4.2 * len(SITES) + 1, 0.35 * len(tokens) + 2.2)
        axes = fig.subplots(1, len(SITES), squeeze=False)[0]
        for ax, site in zip(axes, SITES, strict=True):
            values = np.asarray(record[site]).T  # (T, n_layers)
            image = ax.imshow(values, aspect="auto", cmap="Purples", vmin=min(values.min(), record["p_corrupt"]),
                              interpolation="nearest")
            ax.set_yticks(np.arange(len(tokens)), tokens, fontsize=8)
            ax.set_xlabel("layer (centre of the window)" if site != "residual" else "layer")
            ax.set_title(SITE_TITLES[site], fontsize=9)
            fig.colorbar(image, ax=ax, label="P(answer) restored")
        fig.suptitle(f"{label}: causal trace of {record['prompt']!r} -> {record['answer']!r} "
                     f"(P clean {record['p_clean']:.3g}, corrupted {record['p_corrupt']:.3g})"
                     + (f"\n{caveat}" if caveat else ""), fontsize=10)
        paths.append(save(fig, folder / f"{prefix}{record['id']}.png"))
    return paths


def plot_aie_curves(summaries: Mapping[str, dict], path: Path, caveat: str | None = None) -> Path:
    """Average indirect effect over layers of the six token groups: rows = sites, columns = models."""
    fig = new_figure(5.0 * len(summaries), 3.2 * len(SITES))
    axes = fig.subplots(len(SITES), len(summaries), squeeze=False)
    for col, (label, summary) in enumerate(summaries.items()):
        for row, site in enumerate(SITES):
            ax = axes[row, col]
            aie = np.asarray(summary["aie"][site], dtype=float)  # (n_layers, 6), NaN = group absent
            for g, group in enumerate(summary["groups"]):
                if not np.isnan(aie[:, g]).all():
                    ax.plot(np.arange(len(aie)), aie[:, g], marker=".", label=GROUP_TITLES[group])
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_title(f"{label}: {SITE_TITLES[site]} ({summary['facts']} facts)", fontsize=9)
            ax.set_xlabel("layer")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("AIE = P restored - P corrupted")
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    _caveat(fig, caveat)
    return save(fig, path)
