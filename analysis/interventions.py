"""Causal checks of knowledge neurons (Dai et al. 2022, section 5), with the controls of Niu et al. (ICLR 2024).

Suppress (activation x 0) or amplify (x 2) a fact's refined knowledge neurons at the positions that predict the
answer's tokens, and measure P(answer) under teacher forcing (the product over answer tokens). Controls: the same
number of random neurons from the same layers (several seeded draws), and the fact's neurons applied to the
other facts of its relation and of other relations: to at most `cross_facts` of each (a seeded sample; all when
there are no more), so the stage grows linearly with the facts.

Every edit of one prompt runs as one row of a single batched forward pass: row r multiplies the neurons of layer
l at the answer positions by `multipliers[r, l]` (ones where untouched).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from common.sampling import sample_indices
from common.tokens import encode
from knowledge_neurons import KnowledgeNeurons, Neuron

FACTORS = {"suppress": 0.0, "amplify": 2.0}
DEFINITION = {
    "edit": "the fact's refined neurons (or a control set) multiplied by the factor at every position that "
    "predicts an answer token",
    "p_answer": "product over answer tokens of P(token | prompt + earlier answer tokens) (teacher forcing)",
    "relative_change_mean": "mean over prompts of (P_edited - P_clean) / P_clean, then over facts in the summary",
    "flip_rate": "share of prompts whose top-1 prediction changes at some answer position",
    "random_neurons": "as many neurons per layer as the fact has, drawn uniformly from the other neurons of "
    "that layer; several seeded draws",
    "same_relation_facts / other_relation_facts": "the fact's neurons suppressed on the prompts of the other "
    "facts of its relation / of other relations: all of them, or a seeded sample of cross_facts of each when "
    "there are more (see sampling)",
    "relative_change_sem / flip_rate_sem": "in the summary: standard error of the mean over facts, sample "
    "standard deviation (ddof 1) / sqrt(n_facts); null for fewer than 2 facts",
}


@dataclass
class Edit:
    """One row: which fact's neurons (or which control) are scaled, and by how much."""

    kind: str  # "own", "random", "cross"
    source: str  # fact whose neurons (or whose layers, for random) are used
    factor: float
    neurons: list[tuple[int, int]]


def edited_answer_probability(kn: KnowledgeNeurons, prompt_ids: list[int], answer_ids: list[int],
                              multipliers: Tensor) -> tuple[Tensor, Tensor]:
    """P(answer) (rows,) and top-1 predictions (rows, n_answer) with neurons scaled by multipliers (rows, L, W).

    Row 0 of the result is not special; pass a row of ones to get the clean model.
    """
    ad = kn.adapter
    ids = torch.tensor(prompt_ids + answer_ids[:-1], device=ad.device)
    positions = torch.arange(len(prompt_ids) - 1, len(ids), device=ad.device)  # predict answer token k
    rows = len(multipliers)

    def scale(layer: int):
        def hook(module, args):
            x = args[0].clone()  # (rows, T, W)
            x[:, positions] = x[:, positions] * multipliers[:, layer, None, :].to(x.dtype)
            return (x, *args[1:])

        return hook

    handles = [ad.neuron_module(layer).register_forward_pre_hook(scale(layer)) for layer in range(ad.n_layers)]
    try:
        with torch.no_grad():
            logits = kn.adapter.logits(ids[None].expand(rows, -1), positions=positions)  # (rows, n, V)
    finally:
        for handle in handles:
            handle.remove()
    targets = torch.tensor(answer_ids, device=ad.device)
    p = logits.float().softmax(-1).gather(-1, targets[None, :, None].expand(rows, -1, 1))[..., 0]
    return p.prod(-1).cpu(), logits.argmax(-1).cpu()


def random_controls(neurons: Sequence[tuple[int, int]], width: int, draws: int, rng: np.random.Generator):
    """`draws` sets of random neurons, each with as many per layer as `neurons` has, avoiding `neurons`."""
    per_layer: dict[int, set[int]] = {}
    for layer, i in neurons:
        per_layer.setdefault(layer, set()).add(i)
    sets = []
    for _ in range(draws):
        chosen = []
        for layer, taken in sorted(per_layer.items()):
            pool = np.setdiff1d(np.arange(width), sorted(taken))
            chosen += [(layer, int(i)) for i in rng.choice(pool, size=len(taken), replace=False)]
        sets.append(chosen)
    return sets


def cross_sources(facts, refined: Mapping[str, Sequence[Neuron]], cross_facts: int | None,
                  seed: int) -> dict[str, list[str]]:
    """target fact id -> the facts whose neurons are suppressed on its prompts. Every fact with neurons is applied
    to `cross_facts` other facts of its relation and `cross_facts` facts of other relations, seeded samples without
    replacement (all when there are no more, or cross_facts is None); linear in the facts."""
    order = sorted(range(len(facts)), key=lambda i: facts[i].relation)  # each relation one block [a, b) of order
    where = np.empty(len(facts), dtype=np.int64)
    where[order] = np.arange(len(facts))
    block: dict[str, list[int]] = {}
    for position, i in enumerate(order):
        block.setdefault(facts[i].relation, [position, position])[1] = position + 1
    targets: dict[str, list[str]] = {f.id: [] for f in facts}
    for i, f in enumerate(facts):
        if not refined[f.id]:
            continue
        a, b = block[f.relation]
        same = a + sample_indices(b - a - 1, cross_facts, seed, f"interventions same relation {f.id}")
        same += same >= where[i]  # skip the fact itself
        other = sample_indices(len(facts) - (b - a), cross_facts, seed, f"interventions other relations {f.id}")
        other += (other >= a) * (b - a)  # skip the fact's relation
        for position in np.concatenate([same, other]):
            targets[facts[order[position]].id].append(f.id)
    return targets


def _edits(fact_id: str, refined: Mapping[str, Sequence[Neuron]],
           controls: Mapping[str, list[list[tuple[int, int]]]], sources: Sequence[str]) -> list[Edit]:
    """The rows run on the prompts of `fact_id`: own and random edits (both factors), the neurons of `sources`
    suppressed."""
    own = [(lay, i) for lay, i, _ in refined[fact_id]]
    edits = []
    if own:
        for factor in FACTORS.values():
            edits.append(Edit("own", fact_id, factor, own))
            edits += [Edit("random", fact_id, factor, c) for c in controls[fact_id]]
    edits += [Edit("cross", other, 0.0, [(lay, i) for lay, i, _ in refined[other]]) for other in sources]
    return edits


def run_interventions(kn: KnowledgeNeurons, facts, refined: Mapping[str, Sequence[Neuron]], draws: int = 5,
                      seed: int = 0, progress: bool = True, label: str = "", cross_facts: int | None = None) -> dict:
    """All edits on all prompts; returns per-fact and summary effects and the sampling (JSON-ready). `label`
    names the model in the progress bar; `cross_facts`: see `cross_sources` (None: every other fact).

    Effect of an edit on a prompt = relative change of P(answer): (P_edited - P_clean) / P_clean.
    Flip = the top-1 prediction at some answer position differs from the clean model's.
    """
    rng = np.random.default_rng(seed)
    controls = {
        fid: random_controls([(lay, i) for lay, i, _ in ns], kn.width, draws, rng) for fid, ns in refined.items()
    }
    sources = cross_sources(facts, refined, cross_facts, seed)
    # effects[(kind, source, factor, target)] -> list over target's prompts of (relative change, flipped)
    effects: dict[tuple, list[tuple[float, bool]]] = {}
    for fact in tqdm(facts, desc=f"interventions {label}".strip(), unit="fact", disable=not progress):
        edits = _edits(fact.id, refined, controls, sources[fact.id])
        if not edits:
            continue
        mult = torch.ones(len(edits) + 1, kn.n_layers, kn.width, device=kn.adapter.device)
        for r, e in enumerate(edits, start=1):
            for lay, i in e.neurons:
                mult[r, lay, i] = e.factor
        for prompt in fact.prompts:
            prompt_ids, answer_ids = encode(kn.tokenizer, prompt, fact.answer, f"fact {fact.id}")
            p, top = edited_answer_probability(kn, prompt_ids, answer_ids, mult)
            for r, e in enumerate(edits, start=1):
                change = float((p[r] - p[0]) / p[0]) if p[0] > 0 else None
                flipped = bool((top[r] != top[0]).any())
                effects.setdefault((e.kind, e.source, e.factor, fact.id), []).append((change, flipped))
    with_neurons = sum(1 for f in facts if refined[f.id])
    return {**summarise(facts, refined, effects),
            "sampling": {"facts": len(facts), "facts_with_neurons": with_neurons, "cross_facts": cross_facts,
                         "seed": seed, "cross_edits": sum(len(v) for v in sources.values()),
                         "all_other_facts": all(len(v) == with_neurons - bool(refined[f.id])
                                                for f, v in zip(facts, sources.values(), strict=True))}}


def _stats(pairs: list[tuple[float | None, bool]]) -> dict:
    changes = [c for c, _ in pairs if c is not None]
    return {
        "relative_change_mean": float(np.mean(changes)) if changes else None,
        "flip_rate": float(np.mean([f for _, f in pairs])) if pairs else None,
        "n": len(pairs),
    }


def summarise(facts, refined, effects) -> dict:
    """Per fact: own vs random (suppress and amplify), own vs same-relation vs other-relation (suppress)."""
    relation = {f.id: f.relation for f in facts}
    cross: dict[tuple[str, bool], list] = {(f.id, same): [] for f in facts for same in (True, False)}
    for (kind, source, _, target), pairs in effects.items():  # (source, same relation?) -> its pairs
        if kind == "cross":
            cross[source, relation[target] == relation[source]].extend(pairs)
    per_fact = []
    for f in facts:
        if not refined[f.id]:
            per_fact.append({"fact": f.id, "relation": f.relation, "n_neurons": 0})
            continue
        row = {"fact": f.id, "relation": f.relation, "n_neurons": len(refined[f.id])}
        for name, factor in FACTORS.items():
            row[name] = {
                "knowledge_neurons": _stats(effects.get(("own", f.id, factor, f.id), [])),
                "random_neurons": _stats(effects.get(("random", f.id, factor, f.id), [])),
            }
        row["suppress"]["same_relation_facts"] = _stats(cross[f.id, True])
        row["suppress"]["other_relation_facts"] = _stats(cross[f.id, False])
        per_fact.append(row)
    return {"factors": FACTORS, "definition": DEFINITION, "per_fact": per_fact, "summary": _summary(per_fact)}


def _summary(per_fact: list[dict]) -> dict:
    """Means over facts that have knowledge neurons."""
    rows = [r for r in per_fact if r["n_neurons"]]

    def values(path: tuple[str, ...]) -> list[float]:
        out = []
        for r in rows:
            v = r
            for key in path:
                v = v[key]
            if v is not None:
                out.append(v)
        return out

    def mean(v: list[float]) -> float | None:
        return float(np.mean(v)) if v else None

    def sem(v: list[float]) -> float | None:
        return float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None

    out = {"facts_with_neurons": len(rows)}
    for name in FACTORS:
        controls = ["knowledge_neurons", "random_neurons"]
        if name == "suppress":
            controls += ["same_relation_facts", "other_relation_facts"]
        out[name] = {}
        for c in controls:
            change, flips = values((name, c, "relative_change_mean")), values((name, c, "flip_rate"))
            out[name][c] = {"relative_change_mean": mean(change), "relative_change_sem": sem(change),
                            "flip_rate": mean(flips), "flip_rate_sem": sem(flips), "n_facts": len(flips)}
    return out
