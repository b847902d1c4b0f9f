"""The knowledge stage's batches across facts: the prompts of several facts in one staircase give each fact the
numbers it gets alone, in the facts' order, with the cache and resume as before."""

from __future__ import annotations

import logging

import pytest
import torch

from analysis.stage import PROMPTS_PER_BATCH, Options, fact_batches, find_knowledge_neurons
from facts import FACTS
from knowledge_neurons import KnowledgeNeurons

SUBSET = FACTS[:7]


def test_fact_batches_hold_whole_facts_of_similar_length(tiny_gpt2):
    _, tokenizer = tiny_gpt2
    facts = list(FACTS)
    sizes = [len(f.prompts) for f in facts]
    batches = fact_batches(tokenizer, facts, 5)
    assert sorted(i for b in batches for i in b) == list(range(len(facts)))  # every fact once
    for b in batches:
        assert sum(sizes[i] for i in b) <= 5 or len(b) == 1  # a larger fact is a batch of its own
    longest = [max(len(tokenizer(p + " " + f.answer)["input_ids"]) for p in f.prompts) for f in facts]
    order = [longest[i] for b in batches for i in b]
    assert order == sorted(order)  # by length, so a batch pads little
    assert fact_batches(tokenizer, [], 5) == []


@pytest.mark.parametrize("arch", ["gpt2", "mamba"])
def test_batches_across_facts_equal_the_per_fact_path(request, arch):
    """prompts_per_batch=1 puts each fact in a batch of its own (the former per-fact path); 64 puts all seven in
    one. Same scores, deltas and probabilities to float32 rounding, facts in their order; the options record the
    batch size used."""
    kn = KnowledgeNeurons(*request.getfixturevalue(f"tiny_{arch}"))
    alone = find_knowledge_neurons(kn, SUBSET, Options(steps=3, prompts_per_batch=1), "tiny", progress=False)
    together = find_knowledge_neurons(kn, SUBSET, Options(steps=3, prompts_per_batch=64), "tiny", progress=False)
    assert together.options.prompts_per_batch == 64 and alone.options.prompts_per_batch == 1
    for a, b in zip(alone.facts, together.facts, strict=True):
        assert a.fact is b.fact and a.prompt_ids == b.prompt_ids and a.answer_ids == b.answer_ids
        scale = a.scores.abs().max()
        assert torch.allclose(a.scores, b.scores, rtol=0, atol=1e-6 * scale)
        assert torch.allclose(a.delta, b.delta, rtol=0, atol=1e-6)
        for p, q in zip(a.probs, b.probs, strict=True):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-7)


def test_default_batch_size_is_the_devices(tiny_gpt2):
    kn = KnowledgeNeurons(*tiny_gpt2)
    result = find_knowledge_neurons(kn, SUBSET[:1], Options(steps=1), "tiny", progress=False)
    assert result.options.prompts_per_batch == PROMPTS_PER_BATCH["cpu"]


def test_resume_takes_cached_facts_and_batches_the_rest(tiny_gpt2, tmp_path, caplog):
    kn = KnowledgeNeurons(*tiny_gpt2)
    options = Options(steps=2, prompts_per_batch=6)
    first = find_knowledge_neurons(kn, SUBSET[:3], options, "tiny", tmp_path, progress=False)
    with caplog.at_level(logging.INFO):
        every = find_knowledge_neurons(kn, SUBSET, options, "tiny", tmp_path, progress=False)
    assert "reused 3 of 7 facts" in caplog.text
    assert [r.fact for r in every.facts] == list(SUBSET)
    for a, b in zip(first.facts, every.facts[:3], strict=True):
        assert torch.equal(a.scores, b.scores)
    fresh = find_knowledge_neurons(kn, SUBSET, options, "tiny", progress=False)
    for a, b in zip(fresh.facts, every.facts, strict=True):
        assert torch.allclose(a.scores, b.scores, rtol=0, atol=1e-6 * a.scores.abs().max())


def test_real_sized_models_get_small_cpu_batches():
    """A CPU default of CPU_LARGE_MODEL prompts above LARGE_MODEL_NEURONS neurons (GPT-2-small: 12 x 3072), the
    device's default below, and the option whenever it is given."""
    import torch

    from analysis.stage import CPU_LARGE_MODEL, LARGE_MODEL_NEURONS, prompts_per_batch

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert prompts_per_batch(Options(), cpu, 12 * 3072) == CPU_LARGE_MODEL
    assert prompts_per_batch(Options(), cpu, LARGE_MODEL_NEURONS) == PROMPTS_PER_BATCH["cpu"]
    assert prompts_per_batch(Options(), cuda, 12 * 3072) == PROMPTS_PER_BATCH["cuda"]
    assert prompts_per_batch(Options(prompts_per_batch=7), cpu, 12 * 3072) == 7
