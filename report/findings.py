"""Plain sentences that say what the numbers of a run show, generated from those numbers (never written by hand),
for the report: where knowledge neurons sit, whether facts of a relation share them, whether they matter more
than random neurons, and where Mamba's knowledge neurons read from. Numbers carry 3 significant digits.
"""

from __future__ import annotations

import numpy as np

from analysis.stage import ModelResult

SIGNIFICANCE = 0.05  # the level at which a permutation-test p-value is called significant in the text


def num(value: float) -> str:
    """3 significant digits."""
    return f"{value:.3g}"


def pct(fraction: float) -> str:
    """A fraction as a percentage with 3 significant digits, sign kept: -0.723 -> '-72.3 %'."""
    return f"{100 * fraction:.3g} %"


def p_value(perm: dict) -> str:
    """'p = 0.0123', or at the resolution limit of the test 'p < 0.001 (the smallest possible with 1000
    permutations)': with n relabellings p = (1 + #{null >= observed}) / (1 + n) is never below 1 / (n + 1)."""
    p, n = perm["p_value"], perm["n_permutations"]
    if p is None:
        return "p undefined"
    if p <= 1 / (n + 1) * (1 + 1e-9):
        return f"p < {num(1 / n)} (the smallest possible with {n} permutations)"
    return f"p = {num(p)}"


def knowledge_neurons(label: str, result: ModelResult) -> str:
    """How many knowledge neurons, and which layers hold most of them."""
    per_layer = np.asarray(result.layer_distribution, dtype=float)
    total, n_facts = int(per_layer.sum()), len(result.facts)
    if total == 0:
        return f"{label}: no fact has refined knowledge neurons at these thresholds."
    empty = sum(not v for v in result.refined.values())
    peaks = [int(k) for k in np.flatnonzero(per_layer == per_layer.max())]  # ties: every layer that holds the most
    upper = per_layer[result.n_layers // 2:].sum() / total
    none = {0: "every fact has some", 1: "1 fact has none"}.get(empty, f"{empty} facts have none")
    share = pct(per_layer[peaks[0]] / total)
    most = (f"Layer {peaks[0]} of 0-{result.n_layers - 1} holds the most ({share})" if len(peaks) == 1 else
            f"Layers {', '.join(map(str, peaks[:-1]))} and {peaks[-1]} of 0-{result.n_layers - 1} hold the most, "
            f"{int(per_layer[peaks[0]])} each ({share} each)")
    return (f"{label}: {total} knowledge neurons over {n_facts} facts ({num(total / n_facts)} per fact; {none}). "
            f"{most}, and the upper half of the layers holds {pct(upper)}.")


CONVERGED = 0.5  # a completeness delta above this share of the change of P it should equal: IG has not converged
SMALL_CHANGE = 0.01  # changes of P below this are measured against it, so that a tiny change does not blow up


def completeness(label: str, result: ModelResult) -> str | None:
    """A warning when integrated gradients have not converged: the largest completeness delta (sum of a layer's
    scores minus the change of P it should equal, P(y | a) - P(y | baseline)) is large against that change;
    None when every delta is within `CONVERGED` of its change of P (or of `SMALL_CHANGE`)."""
    worst, change, delta = 0.0, 0.0, 0.0
    for r in result.facts:
        d = r.delta.double().abs()  # (n_prompts, n_layers)
        dp = (r.score_sums - r.delta.double()).abs()  # (n_prompts, n_layers) |change of P|
        ratio = d / dp.clamp(min=SMALL_CHANGE)
        k = int(ratio.argmax())
        if ratio.flatten()[k] > worst:
            worst, change, delta = float(ratio.flatten()[k]), float(dp.flatten()[k]), float(d.flatten()[k])
    if worst <= CONVERGED:
        return None
    steps = result.options.steps
    return (f"{label}: integrated gradients have not converged at {steps} steps: a completeness delta of "
            f"{num(delta)} against a change of P(answer) of {num(change)} (the sum of a layer's scores should equal "
            f"that change; P itself moves by at most 1), so scores and neurons are unreliable; run again with more "
            f"--steps (e.g. {max(20, 2 * steps)}).")


def relations(label: str, stats: dict) -> str:
    """Whether facts of one relation share more neurons than facts of different relations."""
    perm, boot = stats["permutation_test"], stats["bootstrap"]
    intra, inter = boot["intra_jaccard"]["mean"], boot["inter_jaccard"]["mean"]
    if intra is None or inter is None:
        return f"{label}: intra- and inter-relation overlap cannot be compared (no pairs with neurons on one side)."
    means = f"mean Jaccard {num(intra)} within relations vs {num(inter)} across them"
    test = f"{means}, {p_value(perm)}"
    if intra <= inter:
        return f"{label}: facts of one relation do not share more knowledge neurons than other facts ({means})."
    if perm["p_value"] is not None and perm["p_value"] < SIGNIFICANCE:
        return f"{label}: facts of one relation share more knowledge neurons than facts of different relations: " \
               f"{test}."
    return f"{label}: facts of one relation share slightly more knowledge neurons, but the difference is not " \
           f"significant: {test}."


def _clean_p(result: ModelResult) -> np.ndarray:
    """Clean P(answer) of every prompt of the facts that have knowledge neurons (those the edits run on)."""
    return np.array([float(p.prod()) for r in result.facts if result.refined[r.fact.id] for p in r.probs])


def interventions(label: str, summary: dict, result: ModelResult) -> list[str]:
    """Own neurons vs random ones when suppressed, and what amplifying does (with a reason drawn from the numbers
    when it lowers P(answer))."""
    own, rand = summary["suppress"]["knowledge_neurons"], summary["suppress"]["random_neurons"]
    if own["relative_change_mean"] is None or rand["relative_change_mean"] is None:
        return [f"{label}: no fact has knowledge neurons, so there is nothing to edit."]
    o, r = own["relative_change_mean"], rand["relative_change_mean"]
    spread = 2 * float(np.hypot(own["relative_change_sem"] or 0.0, rand["relative_change_sem"] or 0.0))
    effect = (f"suppressing a fact's knowledge neurons changes P(answer) by {pct(o)} on average, as many random "
              f"neurons from the same layers by {pct(r)}")
    if o < r - spread:
        verdict = f"{label}: {effect}; the knowledge neurons matter more than random ones (by more than two " \
                  "standard errors)."
    elif o < r:
        verdict = f"{label}: {effect}; the difference lies within two standard errors, so it is not clear."
    else:
        verdict = f"{label}: {effect}; the knowledge neurons do not lower P(answer) more than random neurons do."
    lines = [verdict]
    amp = summary["amplify"]["knowledge_neurons"]["relative_change_mean"]
    if amp is not None and amp < 0:
        p = _clean_p(result)
        headroom = float(np.mean((1 - p) / p))
        lines.append(
            f"{label}: amplifying (x2) the knowledge neurons lowers P(answer) too ({pct(amp)}). The clean P(answer) "
            f"of these prompts averages {num(float(p.mean()))}, so it could rise by at most {pct(headroom)} "
            "((1 - P) / P, averaged over prompts), while doubling activations also moves the model away from the "
            "states it was trained on; here that costs more than there was to gain."
        )
    elif amp is not None:
        lines.append(f"{label}: amplifying (x2) the knowledge neurons raises P(answer) by {pct(amp)}.")
    return lines


def attention(label: str, entry: dict) -> list[str]:
    """Where one model's knowledge neurons read from (state-space models) and where its answer position mixes
    from. entry: one model of mamba_analysis.json's `models`."""
    lines = []
    analysis = entry["hidden_attention"]
    if analysis is not None:
        overall = analysis["overall"]
        if overall["n"] == 0:
            lines.append(f"{label}: no knowledge neurons, so there is no token flow to report.")
        else:
            a = overall["absolute"]
            subject = [e["flow"]["absolute"]["subject"] for e in analysis["by_layer"]]
            peak = max((v, k) for k, v in enumerate(subject) if v is not None)
            lines.append(
                f"{label}: its knowledge neurons take {pct(a['subject'])} of their |contributions| from subject "
                f"tokens, {pct(a['last'])} from the last token (its own position, including the scan's skip term "
                f"D·x, which is not attention) and {pct(a['other'])} from the others "
                f"({overall['n']} neuron-prompt pairs); the subject share is largest in layer {peak[1]} "
                f"({pct(peak[0])})."
            )
    mixing = entry["token_mixing"]
    defined = [(v, k) for k, v in enumerate(mixing["mean"]["subject"]) if v is not None]
    if defined:
        peak = max(defined)
        what = "hidden attention" if analysis is not None else "attention"
        lines.append(
            f"{label}: {what} from the answer position puts {pct(float(np.mean([v for v, _ in defined])))} on "
            f"subject tokens on average over layers, most in layer {peak[1]} ({pct(peak[0])})."
        )
    return lines
