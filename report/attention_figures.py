"""Figures of where knowledge neurons read from: Mamba's hidden-attention maps of a prompt, and token flow by layer
beside GPT-2's attention. The numbers come from `attention_neurons`; this module only draws them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.patches import Rectangle
from torch import nn

from attention_neurons import GROUPS, mean_abs_hidden_attention
from common.errors import UserError
from common.tokens import encode_prompt, subject_positions
from report.figures import ARCHITECTURES, new_figure, save, title

STYLES = {"subject": ("tab:red", "o"), "last": ("tab:blue", "s"), "other": ("tab:gray", "^")}  # color, marker
VISIBLE = {" ": "␣", "\n": "\\n", "\t": "\\t", "\r": "\\r"}  # whitespace as it is drawn in token labels


def token_labels(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's text with its whitespace visible: '␣' for a space, '\\n' for a newline."""
    return ["".join(VISIBLE.get(c, c) for c in tokenizer.decode([i])) for i in ids]


def _mark_subject(ax, positions: set[int]) -> None:
    for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
        for k, tick in enumerate(ticks):
            if k in positions:
                tick.set_color(STYLES["subject"][0])
                tick.set_fontweight("bold")


def units(architecture: str) -> str:
    """What hidden attention is averaged over: Mamba-2's alpha is one per head, the others' one per channel."""
    return "heads" if architecture == "mamba2" else "channels"


def plot_hidden_attention(model: nn.Module, tokenizer, prompt: str, layers: Sequence[int], path: str | Path,
                          subject: str | None = None, caveat: str | None = None, name: str | None = None) -> Path:
    """Unit-averaged |alpha| maps (over channels, or Mamba-2's heads) of a few layers of a state-space model side
    by side, on one colour scale; returns the PNG.

    The tokens of `subject` are marked in red, the row of the last prompt token (the position that predicts
    the answer) is boxed; `name` (default: the architecture) names the model in the title, `caveat` is added.
    """
    if not layers:
        raise UserError("a hidden-attention plot needs at least one layer")
    ids = encode_prompt(tokenizer, prompt)
    maps = mean_abs_hidden_attention(model, torch.tensor(ids), layers).double().cpu().numpy()  # (layers, T, T)
    T, labels = len(ids), token_labels(tokenizer, ids)
    marked = set(subject_positions(tokenizer, prompt, subject)) if subject else set()
    above = np.triu(np.ones((T, T), dtype=bool), k=1)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    side = max(3.5, 0.3 * T + 1.8)
    fig = new_figure(side * len(layers) + 1.5, side + 1.2)
    axes = fig.subplots(1, len(layers), squeeze=False)[0]
    for ax, layer, amap in zip(axes, layers, maps, strict=True):
        image = ax.imshow(np.ma.masked_array(amap, above), cmap=cmap, vmin=0.0, vmax=float(maps.max()))
        ax.set_xticks(range(T), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(T), labels, fontsize=8)
        _mark_subject(ax, marked)
        ax.add_patch(Rectangle((-0.5, T - 1.5), T, 1, fill=False, edgecolor="tab:red", lw=1.5))
        ax.set_xlabel("attended token j")
        ax.set_ylabel("query token i")
        ax.set_title(f"layer {layer}")
    arch = model.config.model_type
    fig.colorbar(image, ax=list(axes), shrink=0.8, pad=0.02,
                 label=f"mean |α[i, j]| over {units(arch)} (unitless)\none colour scale for all panels")
    lines = [f"{name or ARCHITECTURES.get(arch, arch)}: hidden attention (Ali et al. 2024) of {prompt!r}",
             "red labels: subject tokens; red box: the last prompt token, which predicts the answer; ␣ = space"]
    title(fig, "\n".join([*lines, *([caveat] if caveat else [])]))
    return save(fig, path)


def _nan(values: Iterable[float | None]) -> list[float]:
    return [np.nan if v is None else v for v in values]


def _shares(ax, layers: Sequence[int], series: dict[str, list[float | None]], last: str = "last") -> None:
    """One line per token group (subject / last / other) over layers; `last` labels the last token's line."""
    for g in GROUPS:
        color, marker = STYLES[g]
        ax.plot(layers, _nan(series[g]), "-", marker=marker, color=color, label=last if g == "last" else g)


def plot_subject_flow(analysis: dict, path: str | Path, gpt2: dict | None = None, caveat: str | None = None,
                      name: str = "Mamba", beside_name: str = "GPT-2", unit: str = "channels") -> Path:
    """By layer, one panel each: the subject / last / other share of a state-space model's knowledge-neuron
    activations (|contribution| shares; the last token's share holds the skip term D x of its own position),
    its unit-averaged hidden attention of the answer position, and a transformer's attention from the answer
    position when `gpt2` (from `gpt2_subject_attention`) is given. `name` / `beside_name` name the two models
    (label and architecture) in the titles; `unit` is what hidden attention is averaged over (`units`)."""
    by_layer = analysis["by_layer"]
    layers = [e["layer"] for e in by_layer]
    fig = new_figure(5.0 * (3 if gpt2 else 2), 4.5)
    axes = fig.subplots(1, 3 if gpt2 else 2, squeeze=False)[0]
    _shares(axes[0], layers, {g: [e["flow"]["absolute"][g] for e in by_layer] for g in GROUPS},
            last="last (incl. skip term D·x)")
    axes[0].set_title(f"{name} knowledge neurons: token flow\n({analysis['overall']['n']} neuron-prompt pairs)")
    axes[0].set_ylabel("share of |contributions| to the neurons (fraction)")
    _shares(axes[1], layers, {g: [e["hidden_attention"][g] for e in by_layer] for g in GROUPS})
    axes[1].set_title(f"{name} hidden attention of the answer position\n(all {unit}, not only knowledge neurons)")
    axes[1].set_ylabel(f"share of mean |α[T-1, j]| over {unit} (fraction)")
    if gpt2:
        _shares(axes[2], range(gpt2["n_layers"]), gpt2["mean"])
        axes[2].set_title(f"{beside_name} attention from the answer position\n(heads averaged, "
                          f"{gpt2['n_prompts']} prompts)")
        axes[2].set_ylabel("attention mass (fraction)")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.set_ylim(-0.02, 1.02)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="tokens", title_fontsize=8)
        ax.title.set_fontsize(10)
    if caveat:
        title(fig, caveat)
    return save(fig, path)
