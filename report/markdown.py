"""The Markdown report of `python main.py comprehensive` and its console tables."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from analysis.stage import ModelResult, knowledge_tables
from common.outputs import table
from models.demo import is_demo_model
from report import findings
from report.figures import CONTROLS, ERROR_BARS, named


def demo_caveat(names: Mapping[str, str], architectures: Mapping[str, str] | None = None) -> str | None:
    """One line for figures, report and console when any model is a demo model; None otherwise. Models are named
    by label, with their architecture (label -> config.model_type) where `architectures` gives it."""
    architectures = architectures or {}
    demo = [named(label, architectures[label]) if label in architectures else label
            for label, name in names.items() if is_demo_model(name)]
    if not demo:
        return None
    what = "tiny demo models" if len(demo) > 1 else "a tiny demo model"
    models = f"{', '.join(demo[:-1])} and {demo[-1]}" if len(demo) > 1 else demo[0]
    return f"{models}: {what} trained on these very facts, not the real checkpoint{'s' * (len(demo) > 1)}"


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
    """Per layer and model: the share of the answer position's token mixing on subject tokens, and for
    state-space models the subject share of their knowledge neurons' |contributions| (exact token flow)."""
    models = doc["models"]
    headers, columns = ["layer"], []
    for label, entry in models.items():
        headers.append(f"{label} mixing subj")
        columns.append(entry["token_mixing"]["mean"]["subject"])
        if entry["hidden_attention"] is not None:
            headers.append(f"{label} KN flow subj")
            columns.append([e["flow"]["absolute"]["subject"] for e in entry["hidden_attention"]["by_layer"]])
    depth = max(len(c) for c in columns)
    rows = [[layer, *(c[layer] if layer < len(c) else None for c in columns)] for layer in range(depth)]
    return (
        "Subject share per layer: of the answer position's token mixing (transformers: attention weights, heads "
        "averaged; state-space models: hidden attention) and of the state-space models' knowledge-neuron "
        "|contributions| (exact token flow)\n\n" + table(headers, rows)
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
        f"{ci(boot['inter_jaccard'])} (mean over every pair of facts, {100 * boot['intra_jaccard']['level']:.0f} % "
        f"bootstrap CI from {boot['intra_jaccard']['n_boot']} resamples of the facts within each relation, not of "
        f"the pairs, which share facts); permutation test of intra > inter "
        f"({perm['n_permutations']} relabellings of the facts, seed {perm['seed']}): {findings.p_value(perm)}."
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
    labels = per_model
    summaries = {lab: m["interventions"]["summary"] for lab, m in labels.items()}
    unconverged = [w for lab, r in results.items() if (w := findings.completeness(lab, r))]
    demo = [
        f"> **Demo models.** {caveat}. They are small enough to train here in seconds and were trained on exactly "
        "the facts analysed below, so the numbers show that the method runs end to end"
        + ("" if unconverged else " and behaves sensibly") + "; they say nothing about what the real checkpoints "
        "of these architectures know.",
        "",
    ] if caveat else []
    lines = [
        f"# Knowledge neurons in {' and '.join(results)}" if len(results) <= 2 else "# Knowledge neurons",
        "",
        *demo,
        f"Models: {', '.join(f'{lab} `{r.name}`' for lab, r in results.items())}. "
        f"Facts: {len(next(iter(results.values())).facts)}. Integrated gradients: {o['steps']} steps, "
        f"`{o['ig_method']}`, baseline `{o['baseline']}`; coarse threshold {o['threshold']} x max, refined share "
        f"{o['share']}; seed {doc['seed']}; torch {doc['versions']['torch']}, transformers "
        f"{doc['versions']['transformers']}. All numbers come from `mamba_comprehensive_analysis.json` and the "
        "per-model JSON files beside this report; they are rounded to 3 significant digits here. (That file keeps "
        "the name it had when the tool compared GPT-2 with Mamba alone, whatever the models; it centres on "
        f"`{doc['label']}`, the first state-space model or else the first model, and holds the others under "
        "`comparison`.)",
        "",
        "## Knowledge neurons",
        "",
        *_bullets([findings.knowledge_neurons(lab, r) for lab, r in results.items()]),
        *_bullets([f"**Warning.** {w}" for w in unconverged]),
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
        *[f"![Jaccard {label}]({figs.get(f'jaccard_{label}') or figs[f'jaccard_relations_{label}']})"
          for label in per_model],
        "",
        "## Causal checks",
        "",
        "Suppressing (x0) or amplifying (x2) a fact's refined knowledge neurons at the answer positions, against "
        f"the same number of random neurons from the same layers ({o['random_draws']} seeded draws), and the "
        f"fact's neurons applied to other facts of the same / other relations. In the figure, {ERROR_BARS}.",
        "",
        *_bullets([_cross_sample(lab, m["interventions"]["sampling"]) for lab, m in labels.items()]),
        "",
        *_bullets([line for lab in labels for line in findings.interventions(lab, summaries[lab], results[lab])]),
        "",
        f"![interventions]({figs['interventions']})",
        "",
        _md_table(interventions_table(summaries)),
        "",
    ]
    if attention is not None:
        lines += _attention_section(attention, figs)
    return "\n".join(lines)


def _cross_sample(label: str, s: dict) -> str:
    """Which other facts each fact's neurons were applied to (the sample of --cross-facts)."""
    if s["all_other_facts"]:
        return f"{label}: each fact's neurons are applied to every other fact ({s['cross_edits']} fact pairs)."
    return (f"{label}, sampled: each fact's neurons are applied to at most {s['cross_facts']} other facts of its "
            f"relation and {s['cross_facts']} of other relations (--cross-facts, seed {s['seed']}, without "
            f"replacement): {s['cross_edits']} fact pairs of {s['facts']} facts.")


def _attention_sample(s: dict) -> str:
    if s["facts_analysed"] == s["facts"]:
        return f"All {s['facts']} facts are analysed; hidden-attention maps of {s['hidden_attention_figures']}."
    return (f"Sampled: {s['facts_analysed']} of {s['facts']} facts (--attention-facts {s['attention_facts']}, seed "
            f"{s['seed']}, without replacement); hidden-attention maps of the first {s['hidden_attention_figures']}.")


def _attention_section(attention: dict, figs: dict) -> list[str]:
    """Where the state-space models' knowledge neurons read from, and every model's token mixing."""
    flows = figs.get("subject_flow_by_model", {})
    return [
        "## Where the knowledge neurons read from",
        "",
        "Hidden attention (Ali et al. 2024) decomposes each knowledge neuron's activation of a state-space model at "
        "the answer position exactly over input tokens. The figures and table give absolute shares (a group's "
        "|contributions| over all |contributions|); the signed shares are in the JSON. Each model's token mixing "
        "from the answer position (hidden attention over all units, or a transformer's head-averaged attention) "
        "is shown beside them.",
        "",
        _attention_sample(attention["sampling"]),
        "",
        *_bullets([line for label, entry in attention["models"].items()
                   for line in findings.attention(label, entry)]),
        "",
        *[f"![subject flow {label}]({path})" for label, path in flows.items()],
        "",
        _md_table(attention_table(attention)),
        "",
        "### Hidden-attention maps",
        "",
        "Unit-averaged |α| of each fact's first prompt at four layers across the depth, one colour scale per "
        "figure; red labels mark the subject tokens, the red box the last prompt token (it predicts the answer).",
        "",
        *[f"![hidden attention {Path(f).stem.removeprefix('hidden_attention_')}]({f})"
          for f in figs["hidden_attention"]],
        "",
    ]
