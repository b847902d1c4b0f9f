"""The Markdown report of `python main.py comprehensive` and its console tables."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import findings
from analysis import ModelResult, knowledge_tables
from demo_models import is_demo_model
from figures import CONTROLS, ERROR_BARS
from outputs import table

LABELS = {"gpt2": "GPT-2", "mamba": "Mamba"}


def demo_caveat(names: Mapping[str, str]) -> str | None:
    """One line for figures, report and console when any model is a demo model; None otherwise."""
    demo = [LABELS.get(arch, arch) for arch, name in names.items() if is_demo_model(name)]
    if not demo:
        return None
    what = "tiny demo models" if len(demo) > 1 else "a tiny demo model"
    return f"{' and '.join(demo)}: {what} trained on these very facts, not the real checkpoint{'s' * (len(demo) > 1)}"


def interventions_table(summaries: dict[str, dict]) -> str:
    """Mean relative change of P(answer) and flip rate with their standard errors over facts, knowledge neurons vs
    controls, one column group a model."""
    headers = ["intervention"] + [h for label in summaries for h in (f"{label} dP/P", "s.e.", f"{label} flips", "s.e.")]
    rows = []
    for op, ctrl, name in CONTROLS:
        row = [name]
        for s in summaries.values():
            cell = s[op][ctrl]
            row += [cell["relative_change_mean"], cell["relative_change_sem"], cell["flip_rate"], cell["flip_rate_sem"]]
        rows.append(row)
    return (
        "Interventions: mean relative change of P(answer) (dP/P) and top-1 flip rate over facts with knowledge "
        "neurons; s.e. = standard error of the mean over facts\n\n" + table(headers, rows)
    )


def attention_table(doc: dict) -> str:
    """Per layer: where Mamba's knowledge neurons read from, next to GPT-2's attention from the answer position."""
    by_layer = doc["hidden_attention"]["by_layer"]
    gpt2 = doc["gpt2_attention"]["mean"]
    rows = []
    for layer in range(max(len(by_layer), len(gpt2["subject"]))):
        flow = by_layer[layer]["flow"] if layer < len(by_layer) else {"n": None, "absolute": {}}
        g = {k: v[layer] if layer < len(v) else None for k, v in gpt2.items()}
        rows.append([layer, flow["n"], *(flow["absolute"].get(k) for k in ("subject", "last", "other")),
                     g["subject"], g["last"], g["other"]])
    headers = ["layer", "Mamba KN x prompts", "flow subject", "flow last", "flow other", "GPT-2 attn subject",
               "attn last", "attn other"]
    return (
        "Token -> knowledge-neuron flow in Mamba (absolute shares) and GPT-2 attention from the answer position "
        "(heads averaged)\n\n" + table(headers, rows)
    )


def _md_table(text_table: str) -> str:
    """A console table as a fenced block, so Markdown keeps its alignment."""
    return f"```\n{text_table}\n```"


def _stats_line(label: str, stats: dict) -> str:
    perm = stats["permutation_test"]
    boot = stats["bootstrap"]

    def ci(b: dict) -> str:
        if b["mean"] is None:
            return "undefined (no pairs)"
        return f"{b['mean']:.3g} [{b['low']:.3g}, {b['high']:.3g}]"

    return (
        f"- **{label}**: intra-relation Jaccard {ci(boot['intra_jaccard'])}, inter-relation "
        f"{ci(boot['inter_jaccard'])} (mean, {100 * boot['intra_jaccard']['level']:.0f} % bootstrap CI, "
        f"{boot['intra_jaccard']['n_boot']} resamples); permutation test of intra > inter "
        f"({perm['n_permutations']} relabellings, seed {perm['seed']}): {findings.p_value(perm)}."
    )


def _bullets(lines: list[str]) -> list[str]:
    return [f"- {line}" for line in lines]


def comprehensive_report(doc: dict, results: dict[str, ModelResult], per_model: dict[str, dict],
                         attention: dict, caveat: str | None = None) -> str:
    """Markdown that a reviewer can read without running anything; figures are linked relative to it.

    `caveat` (see `demo_caveat`) is stated under the title when the models are demo models.
    """
    o = doc["options"]
    figs = doc["files"]["figures"]
    labels = {LABELS[a]: m for a, m in per_model.items()}
    summaries = {lab: m["interventions"]["summary"] for lab, m in labels.items()}
    demo = [
        f"> **Demo models.** {caveat}. They are small enough to train here in seconds and were trained on exactly "
        "the facts analysed below, so the numbers show that the method runs end to end and behaves sensibly; they "
        "say nothing about what the real GPT-2 or Mamba know.",
        "",
    ] if caveat else []
    lines = [
        "# Knowledge neurons in GPT-2 and Mamba",
        "",
        *demo,
        f"Models: {', '.join(f'{lab} `{r.name}`' for lab, r in results.items())}. "
        f"Facts: {len(next(iter(results.values())).facts)}. Integrated gradients: {o['steps']} steps, "
        f"`{o['ig_method']}`, baseline `{o['baseline']}`; coarse threshold {o['threshold']} x max, refined share "
        f"{o['share']}; seed {doc['seed']}; torch {doc['versions']['torch']}, transformers "
        f"{doc['versions']['transformers']}. All numbers come from `mamba_comprehensive_analysis.json` and the "
        "per-model JSON files beside this report; they are rounded to 3 significant digits here.",
        "",
        "## Knowledge neurons",
        "",
        *_bullets([findings.knowledge_neurons(lab, r) for lab, r in results.items()]),
        "",
        f"![knowledge neurons per layer]({figs['layer_distribution']})",
        "",
        _md_table(knowledge_tables(results)),
        "",
        "## Do facts of one relation share neurons?",
        "",
        *_bullets([findings.relations(lab, m["statistics"]) for lab, m in labels.items()]),
        "",
        *[_stats_line(lab, m["statistics"]) for lab, m in labels.items()],
        "",
        *[f"![Jaccard {lab}]({figs[f'jaccard_{arch}']})" for arch, lab in LABELS.items() if f"jaccard_{arch}" in figs],
        "",
        "## Causal checks",
        "",
        "Suppressing (x0) or amplifying (x2) a fact's refined knowledge neurons at the answer positions, against "
        f"the same number of random neurons from the same layers ({o['random_draws']} seeded draws), and the "
        f"fact's neurons applied to other facts of the same / other relations. In the figure, {ERROR_BARS}.",
        "",
        *_bullets([line for lab in labels for line in findings.interventions(lab, summaries[lab], results[lab])]),
        "",
        f"![interventions]({figs['interventions']})",
        "",
        _md_table(interventions_table(summaries)),
        "",
        "## Where Mamba's knowledge neurons read from",
        "",
        "Hidden attention (Ali et al. 2024) decomposes each knowledge neuron's activation at the answer position "
        "exactly over input tokens. The figure and table give absolute shares (a group's |contributions| over all "
        "|contributions|); the signed shares are in the JSON. Mamba's hidden attention over all channels and "
        "GPT-2's head-averaged attention from the answer position are shown beside them.",
        "",
        *_bullets(findings.attention(attention["hidden_attention"], attention["gpt2_attention"])),
        "",
        f"![subject flow]({figs['subject_flow']})",
        "",
        _md_table(attention_table(attention)),
        "",
        "### Hidden-attention maps",
        "",
        "Channel-averaged |α| of each fact's first prompt at four layers across the depth, one colour scale per "
        "figure; red labels mark the subject tokens, the red box the last prompt token (it predicts the answer).",
        "",
        *[f"![hidden attention {Path(f).stem.removeprefix('hidden_attention_')}]({f})"
          for f in figs["hidden_attention"]],
        "",
    ]
    return "\n".join(lines)
