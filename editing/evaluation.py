"""Measuring knowledge edits (editing/edits.py) against random-slot controls: every fact updated, every relation erased.

Every measurement scores token sequences (`Probe`) in batched, right-padded forward passes (`score`): a causal
model ignores what follows a position, so right padding changes nothing that is read. `Bench` holds what each
edit is measured on: every prompt of every fact followed by its answer, and the neutral text set
(sources/neutral_text.py). The metrics are defined in `DEFINITION`, which the output file carries.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from analysis.interventions import random_controls
from analysis.stage import ModelResult
from common.sampling import sample_indices
from common.tokens import encode
from editing.edits import EditOptions, Slot, erase, first_token, new_answers, relation_neurons, restored, update
from facts import Fact, relations
from knowledge_neurons import KnowledgeNeurons, Neuron
from sources.neutral_text import SENTENCES


@dataclass
class Probe:
    """A token sequence whose tokens from `start` on are scored, each given everything before it."""

    tokens: list[int]
    start: int


@dataclass
class Scored:
    """logp: (n,) log P of the scored tokens; top1: (n,) the model's top-1 at the positions predicting them."""

    logp: np.ndarray
    top1: np.ndarray

    @property
    def p(self) -> float:
        """P of all scored tokens together (teacher forcing)."""
        return float(np.exp(self.logp.sum()))


def fact_probe(tokenizer, fact: Fact, prompt: str, answer: str) -> Probe:
    prompt_ids, answer_ids = encode(tokenizer, prompt, answer, f"fact {fact.id}")
    return Probe(prompt_ids + answer_ids, len(prompt_ids))


def score(kn: KnowledgeNeurons, probes: Sequence[Probe], max_rows: int = 32, max_logits: int = 2**24) -> list[Scored]:
    """Score every probe with the model as it is now.

    Probes are sorted by length and run in right-padded batches of at most `max_rows` rows and `max_logits`
    logits (larger batches of the small demo models run slower on a CPU, not faster); the LM head runs on the
    positions that some probe of the batch scores.
    """
    device = kn.adapter.device
    vocab = kn.model.get_output_embeddings().weight.shape[0]
    order = sorted(range(len(probes)), key=lambda k: len(probes[k].tokens))
    out: list[Scored | None] = [None] * len(probes)
    begin = 0
    while begin < len(order):
        longest = len(probes[order[min(begin + max_rows, len(order)) - 1]].tokens) - 1  # sorted: the last is longest
        chunk = order[begin:begin + max(1, min(max_rows, max_logits // (longest * vocab)))]
        length = len(probes[chunk[-1]].tokens) - 1
        ids = torch.zeros(len(chunk), length, dtype=torch.long)  # (rows, T) inputs, right-padded
        targets = torch.zeros_like(ids)  # (rows, T) the next token at every position
        mask = torch.zeros_like(ids)
        for r, k in enumerate(chunk):
            tokens = torch.tensor(probes[k].tokens)
            ids[r, : len(tokens) - 1], targets[r, : len(tokens) - 1] = tokens[:-1], tokens[1:]
            mask[r, : len(tokens) - 1] = 1
        # the LM head runs only on the positions some probe of the chunk scores (those predicting tokens[start:])
        needed = sorted({t for k in chunk for t in range(probes[k].start - 1, len(probes[k].tokens) - 1)})
        column = np.full(length, -1)
        column[needed] = np.arange(len(needed))
        positions = torch.tensor(needed, device=device)
        with torch.no_grad():
            logits = kn.adapter.logits(ids.to(device), mask.to(device), positions).float()  # (rows, n, vocab)
            picked = logits.gather(-1, targets.to(device)[:, positions, None])[..., 0] - logits.logsumexp(-1)
            picked = picked.double().cpu().numpy()  # (rows, n) log-softmax of each target, without the whole of it
            top1 = logits.argmax(-1).cpu().numpy()  # (rows, n)
        for r, k in enumerate(chunk):
            scored = column[probes[k].start - 1 : len(probes[k].tokens) - 1]
            out[k] = Scored(picked[r, scored], top1[r, scored])
        begin += len(chunk)
    return out


def _nll(scored: Sequence[Scored]) -> tuple[float, int]:
    """Total negative log-likelihood and number of scored tokens."""
    return -sum(float(s.logp.sum()) for s in scored), sum(len(s.logp) for s in scored)


def perplexity(scored: Sequence[Scored]) -> float:
    """exp(mean NLL per scored token), over all tokens of all probes."""
    nll, n = _nll(scored)
    return float(np.exp(nll / n))


def perplexity_ratio(after: Sequence[Scored], before: Sequence[Scored]) -> float:
    """perplexity(after) / perplexity(before) of the same probes, as exp of the mean NLL difference."""
    (nll_after, n), (nll_before, _) = _nll(after), _nll(before)
    return float(np.exp((nll_after - nll_before) / n))


# ----------------------------------------------------------------------------------------------------------
# the experiment: every fact updated, every relation erased, each against random slots


DEFINITION = {
    "update": "each slot v of the fact's refined knowledge neurons: dai: v <- v - lambda1 e(old) + lambda2 e(new), "
    "lambda_k = norm_lambda_k ||v|| / ||e||; eleuther: v <- v - 2 e(old) + 2 e(new); e(y) = output-embedding row "
    "of y; old / new = first token of the answer / of the new answer",
    "new_answer": "the fact's new_answer from the facts file, else the answer of the next fact of the same "
    "relation (table order, wrapping around) whose answer starts with another token",
    "reliability": "share of the fact's prompts whose top-1 prediction becomes the new answer's first token",
    "generalization": "reliability on the held-out second half of the fact's prompts, editing the refined "
    "neurons found from the first half only (same threshold and share; at least 2 prompts)",
    "locality": "share of the other facts' prompts whose top-1 prediction at the answer position is unchanged "
    "(the other facts' prompts of the locality sample, all of them in small runs; same_relation / "
    "other_relations split them)",
    "perplexity_ratio": "exp(mean NLL per token) after / before on the neutral text set (sources/neutral_text.py); "
    "perplexity_ratio_other_facts: the same over the other facts' answer tokens under teacher forcing",
    "p_new_answer": "mean over the fact's prompts of P(all new-answer tokens) under teacher forcing",
    "erase": "zero the value slots of the erase_top refined neurons that occur in most of the relation's facts",
    "relation_p_change / other_relations_p_change": "mean over facts of the mean over prompts of "
    "(P_after - P_before) / P_before, P = product over answer tokens under teacher forcing",
    "random_neurons": "as many value slots per layer as the edit touches, drawn uniformly from the other neurons "
    "of those layers; random_draws seeded draws per edit (seed, fact or relation id), metrics averaged over draws",
    "summary": "means over the edited facts (update) / erased relations (erase); generalization over the facts "
    "whose half-prompt neuron set is not empty",
}
UPDATE_KEYS = ("reliability", "generalization", "locality", "perplexity_ratio")
ERASE_KEYS = ("relation_p_change", "other_relations_p_change", "perplexity_ratio")
CONTROLS = ("knowledge_neurons", "random_neurons")


class Bench:
    """The probes every edit is measured on: every prompt of the edited facts with its answer, a seeded sample of
    `locality_prompts` prompts of the other facts (all when None or more than there are), and the neutral text.
    The clean scores are of every prompt (one pass, linear in the prompts)."""

    def __init__(self, kn: KnowledgeNeurons, facts: Sequence[Fact], neutral: Sequence[str] = SENTENCES,
                 locality_prompts: int | None = None, seed: int = 0):
        self.kn, self.facts = kn, list(facts)
        self.fact_probes = {f.id: [fact_probe(kn.tokenizer, f, p, f.answer) for p in f.prompts] for f in facts}
        self.first = {fid: ps[0].tokens[ps[0].start] for fid, ps in self.fact_probes.items()}  # answer's 1st token
        self.neutral = [Probe(kn.tokenizer(s, add_special_tokens=False)["input_ids"], 1) for s in neutral]
        every = [(f.id, k) for f in self.facts for k in range(len(f.prompts))]
        self.sample: dict[str, list[int]] = {}
        for i in sample_indices(len(every), locality_prompts, seed, "locality prompts"):
            self.sample.setdefault(every[i][0], []).append(every[i][1])
        self.n_prompts, self.n_sampled = len(every), sum(len(v) for v in self.sample.values())
        self.clean_facts, self.clean_neutral, _ = self.measure(full=[f.id for f in self.facts])
        self.clean_sampled = {fid: [self.clean_facts[fid][k] for k in ks] for fid, ks in self.sample.items()}

    def measure(self, extra: Sequence[Probe] = (), full: Sequence[str] = ()) -> tuple[dict[str, list[Scored]],
                                                                                    list[Scored], list[Scored]]:
        """(fact id -> scores of its prompts: every prompt of the facts in `full`, the sampled prompts of the
        others that have some; neutral-text scores; scores of `extra`) with the model as it is."""
        full = set(full)
        chosen = {f.id: list(range(len(f.prompts))) if f.id in full else self.sample.get(f.id, []) for f in self.facts}
        probes = [self.fact_probes[fid][k] for fid, ks in chosen.items() for k in ks] + self.neutral + list(extra)
        scored = iter(score(self.kn, probes))
        facts = {fid: [next(scored) for _ in ks] for fid, ks in chosen.items() if ks}
        return facts, [next(scored) for _ in self.neutral], list(scored)

    def clean(self, fid: str, full: bool) -> list[Scored]:
        """The clean scores `measure` gives fact `fid` after an edit: all its prompts when full, else the sample."""
        return self.clean_facts[fid] if full else self.clean_sampled.get(fid, [])


def _share(flags: Iterable[bool]) -> float | None:
    flags = list(flags)
    return float(np.mean(flags)) if flags else None


def _mean(values: Iterable[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _mean_dicts(rows: Sequence[dict]) -> dict:
    return {k: _mean(r[k] for r in rows) for k in rows[0]}


def _rel_change(after: Sequence[Scored], before: Sequence[Scored]) -> float | None:
    """Mean over prompts of (P_after - P_before) / P_before; prompts whose P_before underflows to 0 are left out."""
    return _mean([(a.p - b.p) / b.p for a, b in zip(after, before, strict=True) if b.p > 0])


def _update_metrics(bench: Bench, fact: Fact, slots: Sequence[Slot], old: int, new: int, new_probes: list[Probe],
                    options: EditOptions) -> dict:
    """Edit, measure everything, restore."""
    with restored(bench.kn.adapter, slots):
        update(bench.kn.adapter, slots, old, new, options)
        facts_after, neutral_after, new_after = bench.measure(new_probes, full=[fact.id])
    clean = {fid: bench.clean(fid, fid == fact.id) for fid in facts_after}
    others = [f for f in bench.facts if f.id != fact.id and f.id in facts_after]  # the locality sample

    def unchanged(group):
        return _share(bool(a.top1[0] == b.top1[0]) for f in group
                      for a, b in zip(facts_after[f.id], clean[f.id], strict=True))

    return {
        "reliability": _share(bool(s.top1[0] == new) for s in facts_after[fact.id]),
        "locality": unchanged(others),
        "locality_same_relation": unchanged([f for f in others if f.relation == fact.relation]),
        "locality_other_relations": unchanged([f for f in others if f.relation != fact.relation]),
        "perplexity_ratio": perplexity_ratio(neutral_after, bench.clean_neutral),
        "perplexity_ratio_other_facts": perplexity_ratio([s for f in others for s in facts_after[f.id]],
                                                         [s for f in others for s in clean[f.id]]),
        "p_new_answer_after": float(np.mean([s.p for s in new_after])),
        "p_answer_relative_change": _rel_change(facts_after[fact.id], clean[fact.id]),
    }


def _held_out_reliability(bench: Bench, slots: Sequence[Slot], old: int, new: int, probes: list[Probe],
                          options: EditOptions) -> float:
    with restored(bench.kn.adapter, slots):
        update(bench.kn.adapter, slots, old, new, options)
        scored = score(bench.kn, probes)
    return _share(bool(s.top1[0] == new) for s in scored)


def _rng(options: EditOptions, name: str) -> np.random.Generator:
    """A generator of its own for each fact / relation, so a subset of facts gets the same draws."""
    return np.random.default_rng([options.seed, zlib.crc32(name.encode())])


def update_fact(bench: Bench, fact: Fact, neurons: Sequence[Neuron], half: Sequence[Neuron],
                new_answer: tuple[str, str], options: EditOptions) -> dict:
    """Update one fact with its knowledge neurons and with random slots; generalization from half the prompts."""
    tok, width = bench.kn.tokenizer, bench.kn.width
    answer, source = new_answer
    old, new = bench.first[fact.id], first_token(tok, fact, answer)
    new_probes = [fact_probe(tok, fact, p, answer) for p in fact.prompts]
    p_before = float(np.mean([s.p for s in score(bench.kn, new_probes)]))
    slots = [(lay, i) for lay, i, _ in neurons]
    rng = _rng(options, fact.id)
    own = _update_metrics(bench, fact, slots, old, new, new_probes, options)
    rand = _mean_dicts([_update_metrics(bench, fact, c, old, new, new_probes, options)
                        for c in random_controls(slots, width, options.random_draws, rng)])
    n_edit = (len(fact.prompts) + 1) // 2  # the first half finds the neurons, the rest is held out
    half_slots = [(lay, i) for lay, i, _ in half]
    held_out = bench.fact_probes[fact.id][n_edit:]
    own["generalization"] = rand["generalization"] = None
    if half_slots and held_out:
        own["generalization"] = _held_out_reliability(bench, half_slots, old, new, held_out, options)
        rand["generalization"] = _mean(_held_out_reliability(bench, c, old, new, held_out, options)
                                       for c in random_controls(half_slots, width, options.random_draws, rng))
    return {
        "fact": fact.id, "relation": fact.relation, "answer": fact.answer, "new_answer": answer,
        "new_answer_source": source, "old_token": tok.convert_ids_to_tokens(old),
        "new_tokens": tok.convert_ids_to_tokens(new_probes[0].tokens[new_probes[0].start:]),
        "clean_top1_is_answer": _share(bool(s.top1[0] == old) for s in bench.clean_facts[fact.id]),
        "p_new_answer_before": p_before,
        "n_neurons": len(slots), "neurons": [list(s) for s in slots],
        "generalization_neurons": {"edit_prompts": list(fact.prompts[:n_edit]),
                                   "held_out_prompts": list(fact.prompts[n_edit:]),
                                   "neurons": [list(s) for s in half_slots]},
        "knowledge_neurons": own, "random_neurons": rand,
    }


def erase_relation(bench: Bench, relation: str, refined: dict[str, Sequence[Neuron]], options: EditOptions) -> dict:
    """Erase one relation with its most frequent knowledge neurons and with random slots."""
    ids = [f.id for f in bench.facts if f.relation == relation]
    slots = relation_neurons(refined, ids, options.erase_top)
    row = {"relation": relation, "facts": ids, "n_neurons": len(slots), "neurons": [list(s) for s in slots]}
    if not slots:
        return {**row, "skipped": "no refined knowledge neurons in this relation"}

    def metrics(chosen: Sequence[Slot]) -> dict:
        with restored(bench.kn.adapter, chosen):
            erase(bench.kn.adapter, chosen)
            after, neutral_after, _ = bench.measure(full=ids)
        clean = {fid: bench.clean(fid, fid in ids) for fid in after}

        def change(group):
            return _mean(_rel_change(after[fid], clean[fid]) for fid in group)

        def accuracy(scores, group):
            return _share(bool(s.top1[0] == bench.first[fid]) for fid in group for s in scores[fid])

        others = [f.id for f in bench.facts if f.relation != relation and f.id in after]  # the locality sample
        return {
            "relation_p_change": change(ids), "other_relations_p_change": change(others),
            "perplexity_ratio": perplexity_ratio(neutral_after, bench.clean_neutral),
            "relation_accuracy_before": accuracy(clean, ids), "relation_accuracy_after": accuracy(after, ids),
            "other_relations_accuracy_before": accuracy(clean, others),
            "other_relations_accuracy_after": accuracy(after, others),
        }

    controls = random_controls(slots, bench.kn.width, options.random_draws, _rng(options, relation))
    return {**row, "knowledge_neurons": metrics(slots), "random_neurons": _mean_dicts([metrics(c) for c in controls])}


def run_editing(kn: KnowledgeNeurons, result: ModelResult, options: EditOptions, progress: bool = True,
                neutral: Sequence[str] = SENTENCES, label: str | None = None) -> dict:
    """Update every fact and erase every relation of a knowledge-stage result; JSON-ready per-fact, per-relation
    and summary results. `neutral`: the texts of the perplexity ratio; `label` ("GPT-2") names the model in the
    progress bar (default: the folder name). The model's weights are the same, bit for bit, afterwards."""
    facts = [r.fact for r in result.facts]
    bench = Bench(kn, facts, neutral, options.locality_prompts, options.seed)
    answers = new_answers(facts, kn.tokenizer)
    per_fact = []
    edited = [result.facts[i] for i in sample_indices(len(facts), options.edit_facts, options.seed, "edit facts")]
    for r in tqdm(edited, desc=f"editing {label or Path(result.name).name}", unit="fact", disable=not progress):
        fact = r.fact
        neurons = result.refined[fact.id]
        if not neurons or answers[fact.id] is None:
            reason = ("no refined knowledge neurons" if not neurons
                      else "no other answer in its relation and no new_answer in the facts file")
            per_fact.append({"fact": fact.id, "relation": fact.relation, "n_neurons": len(neurons), "skipped": reason})
            continue
        per_fact.append(update_fact(bench, fact, neurons, r.refined_first_half, answers[fact.id], options))
    erased = [erase_relation(bench, rel, result.refined, options) for rel in relations(facts)]
    return {
        "definition": DEFINITION,
        "neutral_text": {"sentences": len(bench.neutral),
                         "tokens_scored": sum(len(p.tokens) - 1 for p in bench.neutral),
                         "perplexity_before": perplexity(bench.clean_neutral)},
        "update": {"per_fact": per_fact, "per_relation": _update_per_relation(per_fact)},
        "erase": {"per_relation": erased},
        "summary": _summary(per_fact, erased),
        "details": _details(per_fact, erased),
        "sampling": {
            "facts": len(facts), "facts_updated": len(edited), "edit_facts": options.edit_facts,
            "prompts": bench.n_prompts, "locality_prompts_measured": bench.n_sampled,
            "locality_prompts": options.locality_prompts, "seed": options.seed,
            "method": "facts to update and other facts' prompts for locality (and the other-relation metrics of "
                      "erasing) are seeded samples without replacement, in table order; all of them when the "
                      "option is at least their number. The edited fact's (or erased relation's) own prompts are "
                      "always measured in full",
        },
    }


def _edited(rows: Sequence[dict]) -> list[dict]:
    return [r for r in rows if "skipped" not in r]


def _update_per_relation(per_fact: Sequence[dict]) -> dict:
    groups: dict[str, list[dict]] = {}
    for r in _edited(per_fact):
        groups.setdefault(r["relation"], []).append(r)
    return {rel: {"facts_edited": len(rows), **{c: _mean_dicts([r[c] for r in rows]) for c in CONTROLS}}
            for rel, rows in groups.items()}


def _summary(per_fact: Sequence[dict], erased: Sequence[dict]) -> dict:
    """Exactly the metrics of the issue: update reliability / generalization / locality / perplexity ratio and
    erase relation / other-relation P change / perplexity ratio, knowledge neurons vs random slots."""
    updated, rels = _edited(per_fact), _edited(erased)
    return {
        "update": {c: {k: _mean(r[c][k] for r in updated) for k in UPDATE_KEYS} for c in CONTROLS},
        "erase": {c: {k: _mean(r[c][k] for r in rels) for k in ERASE_KEYS} for c in CONTROLS},
    }


def _details(per_fact: Sequence[dict], erased: Sequence[dict]) -> dict:
    """The other means over facts / relations, and how many there were."""
    updated, rels = _edited(per_fact), _edited(erased)
    extra_update = [k for k in updated[0]["knowledge_neurons"] if k not in UPDATE_KEYS] if updated else []
    extra_erase = [k for k in rels[0]["knowledge_neurons"] if k not in ERASE_KEYS] if rels else []
    return {
        "facts": len(per_fact), "facts_edited": len(updated),
        "facts_with_generalization": sum(r["knowledge_neurons"]["generalization"] is not None for r in updated),
        "relations": len(erased), "relations_erased": len(rels),
        "update": {c: {k: _mean(r[c][k] for r in updated) for k in extra_update} for c in CONTROLS},
        "update_p_new_answer_before": _mean(r["p_new_answer_before"] for r in updated),
        "erase": {c: {k: _mean(r[c][k] for r in rels) for k in extra_erase} for c in CONTROLS},
    }
