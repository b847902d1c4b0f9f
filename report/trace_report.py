"""The causal-tracing table (console and report) and the report's causal-tracing section."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from common.outputs import table


def _peak(summary: dict, site: str, group: str) -> tuple[float | None, int | None]:
    """(largest AIE over layers, its layer) of a site's token group; (None, None) if no fact has the group."""
    column = np.asarray(summary["aie"][site], dtype=float)[:, summary["groups"].index(group)]
    if np.isnan(column).all():
        return None, None
    layer = int(np.nanargmax(column))
    return float(column[layer]), layer


def _ci(entry: dict) -> str:
    if entry["mean"] is None:
        return "-"
    return f"{entry['mean']:.3g} [{entry['low']:.3g}, {entry['high']:.3g}]"


def trace_table(docs: Mapping[str, dict]) -> str:
    """One row a model: mean P clean / corrupted, peak AIEs, strongest subject knockout, the knowledge-neuron
    cross-check."""
    rows = []
    for label, doc in docs.items():
        s = doc["summary"]
        res_subj, l_subj = _peak(s, "residual", "last_subject")
        kn_subj, l_kn = _peak(s, "kn_site", "last_subject")
        mix_last, l_mix = _peak(s, "token_mixing", "last")
        ko = np.asarray(s["knockout"]["subject_to_last"], dtype=float)
        cross = s["kn_cross_check"]
        rows.append([label, s["facts"], s["p_clean"]["mean"], s["p_corrupt"]["mean"],
                     res_subj, l_subj, kn_subj, l_kn, mix_last, l_mix,
                     float(np.nanmin(ko)) if not np.isnan(ko).all() else None,
                     int(np.nanargmin(ko)) if not np.isnan(ko).all() else None,
                     _ci(cross["restore_kn"]), _ci(cross["restore_random"]),
                     cross["layer_correlation"]["last_subject_token"]])
    return table(["model", "facts", "P clean", "P corrupt", "AIE resid@last subj", "layer", "AIE kn@last subj",
                  "layer", "AIE mix@last", "layer", "knockout subj->last", "layer", "restore KN [CI]",
                  "restore random [CI]", "r(KN layers, kn AIE)"], rows)


def _verdict(label: str, doc: dict) -> str:
    """One honest sentence on whether the causal trace agrees with the knowledge neurons."""
    cross = doc["summary"]["kn_cross_check"]
    kn, rnd = cross["restore_kn"], cross["restore_random"]
    r = cross["layer_correlation"]["last_subject_token"]
    if kn["mean"] is None:
        return f"**{label}**: no fact had refined knowledge neurons to restore, so there is no cross-check."
    if kn["low"] > rnd["high"]:
        restore = ("restoring only the knowledge neurons brings back more of P(answer) than as many random neurons "
                   "of the same layers (the intervals do not overlap)")
    elif kn["high"] < rnd["low"]:
        restore = "restoring the knowledge neurons brings back less of P(answer) than random neurons of their layers"
    else:
        restore = ("restoring the knowledge neurons is not distinguishable from restoring as many random neurons of "
                   "the same layers (the intervals overlap)")
    if r is None:
        layers = "the layer correlation is undefined (a constant profile)"
    elif r >= 0.5:
        layers = (f"their layers follow where restoring the neuron projection at the last subject token helps "
                  f"(r = {r:.2f})")
    elif r <= -0.5:
        layers = f"their layers lie away from where restoring the neuron projection helps (r = {r:.2f})"
    else:
        layers = f"their layers are only weakly related to where the trace peaks (r = {r:.2f})"
    return f"**{label}** ({cross['facts']} facts): {restore}; {layers}."


def trace_section(docs: Mapping[str, dict], caveat: str | None = None) -> str:
    """The report's causal-tracing section (Markdown)."""
    if not docs:
        return ""
    first = next(iter(docs.values()))
    o = first["options"]
    corruption = (f"Gaussian noise (nu = {o['noise']:.3g}, {o['samples']} seeded samples) on the subject's input "
                  "embeddings" if o["corruption"] == "noise" else "the subject swapped for another of its relation")
    lines = [
        "",
        "## Causal tracing",
        "",
        f"Each fact's first prompt is corrupted by {corruption}; one state of the clean run is restored and P(answer's "
        "first token) measured (Meng et al. 2022). The average indirect effect (AIE, P restored - P corrupted) is "
        f"shown for ROME's six token groups; the neuron and token-mixing sites restore a window of {o['window']} "
        f"layers. Knockout (Geva et al. 2023) blocks the last position from reading the subject in "
        f"{o['knockout_window']} layers (attention edges of transformers, hidden-attention terms of state-space "
        "models), as relative change of P. The knowledge-neuron cross-check restores only the fact's refined "
        "knowledge neurons at the last position in the noise-corrupted run, against "
        f"{o['random_draws']} draws of as many random neurons of the "
        "same layers (mean and 95 % bootstrap CI over facts).",
        "",
    ]
    s = first.get("sampling")
    if s and s["facts_traced"] < s["facts"]:
        lines += [f"Sampled: {s['facts_traced']} of {s['facts']} facts traced (--trace-facts {s['trace_facts']}, "
                  f"seed {s['seed']}, without replacement).", ""]
    if caveat:
        lines += [f"> {caveat}: these numbers show the method at work, not what real models know.", ""]
    whole = [label for label, doc in docs.items() if o["window"] >= doc["n_layers"]]
    if whole:
        lines += [f"With a window of {o['window']} layers, every centre layer of {', '.join(whole)} restores all its "
                  "layers: their neuron and token-mixing maps are constant over layers, and the layer correlation "
                  "is undefined (pass a smaller --trace-window).", ""]
    if any(doc["architecture"] not in ("gpt2", "gpt_neox") for doc in docs.values()):
        lines += ["A state-space model's knockout removes hidden-attention terms; its causal convolution still "
                  "lets the last position read the few positions just before it (d_conv - 1), subject tokens "
                  "among them, so a small knockout effect there is a bound, not proof that the subject is unread.",
                  ""]
    lines += ["```", trace_table(docs), "```", ""]
    lines += [f"- {_verdict(label, doc)}" for label, doc in docs.items()]
    lines += ["", f"![causal trace AIE]({first['figures']['aie_curves']})", ""]
    for label, doc in docs.items():
        lines += [f"![causal trace {label} {k}]({path})" for k, path in enumerate(doc["figures"]["heatmaps"])]
    return "\n".join(lines) + "\n"
