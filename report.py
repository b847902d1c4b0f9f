"""The Markdown report of `python main.py comprehensive` and its console tables."""

from __future__ import annotations

from analysis import ModelResult, knowledge_tables
from figures import CONTROLS
from outputs import table

LABELS = {"gpt2": "GPT-2", "mamba": "Mamba"}


def interventions_table(summaries: dict[str, dict]) -> str:
    """Mean relative change of P(answer) and flip rate, knowledge neurons vs controls, one column pair a model."""
    headers = ["intervention"] + [h for label in summaries for h in (f"{label} dP/P", f"{label} flips")]
    rows = []
    for op, ctrl, name in CONTROLS:
        row = [name]
        for s in summaries.values():
            cell = s[op][ctrl]
            row += [cell["relative_change_mean"], cell["flip_rate"]]
        rows.append(row)
    return (
        "Interventions: mean relative change of P(answer) (dP/P) and top-1 flip rate, over facts with knowledge "
        "neurons\n\n" + table(headers, rows)
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


def _stats_lines(label: str, stats: dict) -> list[str]:
    perm = stats["permutation_test"]
    boot = stats["bootstrap"]

    def ci(b: dict) -> str:
        if b["mean"] is None:
            return "undefined (no pairs)"
        return f"{b['mean']:.4f} [{b['low']:.4f}, {b['high']:.4f}]"

    p = "undefined" if perm["p_value"] is None else f"{perm['p_value']:.4g}"
    return [
        f"- **{label}**: intra-relation Jaccard {ci(boot['intra_jaccard'])}, inter-relation "
        f"{ci(boot['inter_jaccard'])} (mean, {100 * boot['intra_jaccard']['level']:.0f} % bootstrap CI, "
        f"{boot['intra_jaccard']['n_boot']} resamples); permutation test of intra > inter: p = {p} "
        f"({perm['n_permutations']} relabellings, seed {perm['seed']})."
    ]


def comprehensive_report(doc: dict, results: dict[str, ModelResult], per_model: dict[str, dict],
                         attention: dict) -> str:
    """Markdown that a reviewer can read without running anything; figures are linked relative to it."""
    o = doc["options"]
    figs = doc["files"]["figures"]
    labels = {LABELS[a]: m for a, m in per_model.items()}
    lines = [
        "# Knowledge neurons in GPT-2 and Mamba",
        "",
        f"Models: {', '.join(f'{lab} `{r.name}`' for lab, r in results.items())}. "
        f"Facts: {len(next(iter(results.values())).facts)}. Integrated gradients: {o['steps']} steps, "
        f"`{o['ig_method']}`, baseline `{o['baseline']}`; coarse threshold {o['threshold']} x max, refined share "
        f"{o['share']}; seed {doc['seed']}; torch {doc['versions']['torch']}, transformers "
        f"{doc['versions']['transformers']}. All numbers come from `mamba_comprehensive_analysis.json` and the "
        "per-model JSON files beside this report.",
        "",
        "## Knowledge neurons",
        "",
        f"![knowledge neurons per layer]({figs['layer_distribution']})",
        "",
        _md_table(knowledge_tables(results)),
        "",
        "## Do facts of one relation share neurons?",
        "",
        *[line for lab, m in labels.items() for line in _stats_lines(lab, m["statistics"])],
        "",
        *[f"![Jaccard {lab}]({figs[f'jaccard_{arch}']})" for arch, lab in LABELS.items() if f"jaccard_{arch}" in figs],
        "",
        "## Causal checks",
        "",
        "Suppressing (x0) or amplifying (x2) a fact's refined knowledge neurons at the answer positions, against "
        f"the same number of random neurons from the same layers ({o['random_draws']} seeded draws), and the "
        "fact's neurons applied to other facts of the same / other relations.",
        "",
        f"![interventions]({figs['interventions']})",
        "",
        _md_table(interventions_table({lab: m["interventions"]["summary"] for lab, m in labels.items()})),
        "",
        "## Where Mamba's knowledge neurons read from",
        "",
        "Hidden attention (Ali et al. 2024) decomposes each knowledge neuron's activation at the answer position "
        "exactly over input tokens; shares are signed and sum to 1. GPT-2's head-averaged attention from the "
        "answer position is shown beside it.",
        "",
        "![subject flow](figures/subject_flow_by_layer.png)",
        "",
        _md_table(attention_table(attention)),
        "",
    ]
    return "\n".join(lines)
