"""Causal checks on the demo models: knowledge neurons matter more than random ones and than other facts'."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.interventions import edited_answer_probability, random_controls, run_interventions
from analysis.stage import Options, find_knowledge_neurons
from common.tokens import encode
from facts import FACTS
from knowledge_neurons import KnowledgeNeurons
from models import load_model


@pytest.fixture(scope="module", params=["gpt2", "mamba"])
def demo_run(request, demo_models):
    model, tokenizer = load_model(str(demo_models[request.param]))
    kn = KnowledgeNeurons(model, tokenizer)
    result = find_knowledge_neurons(kn, FACTS, Options(steps=10), request.param, progress=False)
    return request.param, kn, result.refined


def test_knowledge_neurons_matter_more_than_controls(demo_run):
    arch, kn, refined = demo_run
    summary = run_interventions(kn, FACTS, refined, draws=3, seed=0, progress=False)["summary"]
    s = summary["suppress"]
    kn_drop = s["knowledge_neurons"]["relative_change_mean"]
    random_drop = s["random_neurons"]["relative_change_mean"]
    other = s["other_relation_facts"]["relative_change_mean"]
    print(f"{arch}: suppress KN {kn_drop:+.3f}, random {random_drop:+.3f}, same relation "
          f"{s['same_relation_facts']['relative_change_mean']:+.3f}, other relations {other:+.3f}; "
          f"amplify KN {summary['amplify']['knowledge_neurons']['relative_change_mean']:+.3f}")
    assert summary["facts_with_neurons"] >= len(FACTS) // 2
    assert kn_drop < 0
    assert kn_drop < random_drop - 0.05
    assert kn_drop < other - 0.05


def test_edited_probability_matches_manual_hook(demo_run):
    """Row r of the batched edit equals a separate forward with the same neurons zeroed by hand."""
    _, kn, refined = demo_run
    fact = next(f for f in FACTS if refined[f.id])
    prompt_ids, answer_ids = encode(kn.tokenizer, fact.prompts[0], fact.answer)
    mult = torch.ones(2, kn.n_layers, kn.width)
    for layer, i, _ in refined[fact.id]:
        mult[1, layer, i] = 0.0
    p, _ = edited_answer_probability(kn, prompt_ids, answer_ids, mult)

    ids = torch.tensor([prompt_ids + answer_ids[:-1]])
    start = len(prompt_ids) - 1
    handles = []
    for layer in range(kn.n_layers):
        idx = [i for lay, i, _ in refined[fact.id] if lay == layer]

        def zero(module, args, idx=idx):
            x = args[0].clone()
            x[:, start:, idx] = 0.0
            return (x,)

        handles.append(kn.adapter.neuron_module(layer).register_forward_pre_hook(zero))
    try:
        with torch.no_grad():
            probs = kn.model(ids).logits[0, start:].softmax(-1)
    finally:
        for h in handles:
            h.remove()
    expected = float(np.prod([probs[k, t].item() for k, t in enumerate(answer_ids)]))
    assert p[1].item() == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        clean = kn.model(ids).logits[0, start:].softmax(-1)
    assert p[0].item() == pytest.approx(float(np.prod([clean[k, t].item() for k, t in enumerate(answer_ids)])),
                                        rel=1e-5)


def test_random_controls_match_layers_and_avoid_the_neurons():
    neurons = [(0, 1), (0, 5), (2, 7)]
    sets = random_controls(neurons, width=10, draws=20, rng=np.random.default_rng(0))
    assert len(sets) == 20
    for s in sets:
        assert sorted(lay for lay, _ in s) == [0, 0, 2]
        assert not set(s) & set(neurons)
        assert len(set(s)) == 3
    again = random_controls(neurons, width=10, draws=20, rng=np.random.default_rng(0))
    assert sets == again


def test_summary_gives_the_standard_error_over_facts():
    from statistics import mean, stdev

    from analysis.interventions import summarise
    from facts import Fact

    facts = [Fact(f"f{k}", "r", "S", "A", ("S is",)) for k in range(4)]
    refined = {"f0": [(0, 1, 1.0)], "f1": [(0, 2, 1.0)], "f2": [(1, 0, 1.0)], "f3": []}
    changes = {"f0": [(-0.5, True), (-0.7, True)], "f1": [(-0.2, False)], "f2": [(-0.1, False), (-0.3, True)]}
    effects = {("own", fid, 0.0, fid): pairs for fid, pairs in changes.items()}
    cell = summarise(facts, refined, effects)["summary"]["suppress"]["knowledge_neurons"]
    per_fact = [-0.6, -0.2, -0.2]  # means over each fact's prompts; f3 has no neurons
    flips = [1.0, 0.0, 0.5]
    assert cell["n_facts"] == 3
    assert cell["relative_change_mean"] == pytest.approx(mean(per_fact))
    assert cell["relative_change_sem"] == pytest.approx(stdev(per_fact) / 3**0.5)
    assert cell["flip_rate"] == pytest.approx(mean(flips))
    assert cell["flip_rate_sem"] == pytest.approx(stdev(flips) / 3**0.5)
    random = summarise(facts, refined, effects)["summary"]["suppress"]["random_neurons"]
    assert random == {"relative_change_mean": None, "relative_change_sem": None, "flip_rate": None,
                      "flip_rate_sem": None, "n_facts": 0}


def _invented(relations: dict[str, int]):
    """Facts f<relation>-<k> of the given relation sizes, in an interleaved order (relations not contiguous)."""
    from facts import Fact

    ids = [(r, k) for k in range(max(relations.values())) for r, n in relations.items() if k < n]
    return [Fact(f"{r}-{k}", r, f"S{r}{k}", "A", ("S is", "S was")) for r, k in ids]


def test_cross_sources_without_a_cap_are_every_other_fact():
    from analysis.interventions import cross_sources

    facts = _invented({"a": 3, "b": 5, "c": 1})
    refined = {f.id: [] if f.id == "b-2" else [(0, 1, 1.0)] for f in facts}
    for cap in (None, 100):
        sources = cross_sources(facts, refined, cap, seed=0)
        for f in facts:
            expected = {o.id for o in facts if o.id != f.id and refined[o.id]}
            assert sorted(sources[f.id]) == sorted(expected)


def test_cross_sources_sample_each_source_within_and_across_relations():
    """Each fact with neurons is applied to exactly min(cap, n) facts of its relation (never itself) and of the
    others, without repeats; the sample is a function of the seed."""
    from collections import Counter

    from analysis.interventions import cross_sources

    sizes = {"a": 9, "b": 2, "c": 6, "d": 4}
    facts = _invented(sizes)
    relation = {f.id: f.relation for f in facts}
    refined = {f.id: [(0, 1, 1.0)] for f in facts}
    cap = 3
    sources = cross_sources(facts, refined, cap, seed=7)
    applied = {(s, t) for t, ss in sources.items() for s in ss}
    assert len(applied) == sum(len(ss) for ss in sources.values())  # no target twice for one source
    same = Counter(s for s, t in applied if relation[s] == relation[t])
    other = Counter(s for s, t in applied if relation[s] != relation[t])
    for f in facts:
        assert (f.id, f.id) not in applied
        assert same[f.id] == min(cap, sizes[f.relation] - 1)
        assert other[f.id] == min(cap, len(facts) - sizes[f.relation])
    assert cross_sources(facts, refined, cap, seed=7) == sources
    assert cross_sources(facts, refined, cap, seed=8) != sources


def test_logits_at_positions_equal_the_full_logits(demo_run):
    _, kn, _ = demo_run
    ids = torch.tensor([encode(kn.tokenizer, FACTS[0].prompts[0], FACTS[0].answer)[0]] * 2)
    positions = torch.tensor([0, ids.shape[1] - 1])
    with torch.no_grad():
        full = kn.adapter.logits(ids)
        some = kn.adapter.logits(ids, positions=positions)
    assert some.shape == (2, 2, full.shape[-1])
    torch.testing.assert_close(some, full[:, positions], rtol=1e-5, atol=1e-5)
