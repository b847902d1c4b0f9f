"""The per-fact caches: a damaged file is reported, recomputed and rewritten, never used; the causal-tracing
stage resumes from its cache, and only under the options that gave its numbers."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch

from analysis.stage import FactCache, Options, find_knowledge_neurons
from analysis.tracing import TraceOptions, trace_model
from causal_tracing import CausalTracer
from facts import Fact
from knowledge_neurons import KnowledgeNeurons

FACT = Fact("capital_france", "capital_of", "France", "Paris", ("The capital of France is", "France's capital is"))
OPTIONS = Options(steps=2)

DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "garbage": lambda data: bytes(range(256)) * 4,
    "empty": lambda data: b"",
}


def _run(kn, cache_dir):
    return find_knowledge_neurons(kn, [FACT], OPTIONS, "tiny", cache_dir, progress=False)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_cache_file_is_recomputed(tiny_gpt2, tmp_path, caplog, damage):
    kn = KnowledgeNeurons(*tiny_gpt2)
    first = _run(kn, tmp_path).facts[0]
    (path,) = FactCache(tmp_path, "tiny", kn.model, OPTIONS).folder.glob("*.pt")
    path.write_bytes(DAMAGE[damage](path.read_bytes()))
    with caplog.at_level(logging.INFO):
        again = _run(kn, tmp_path).facts[0]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage() and "recomputing" in warnings[0].getMessage()
    assert "reused" not in caplog.text
    assert torch.equal(again.scores, first.scores)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        third = _run(kn, tmp_path).facts[0]  # the file was rewritten: now it is reused
    assert "reused 1 of 1 facts" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert torch.equal(third.scores, first.scores)


def test_cache_file_of_another_shape_is_recomputed(tiny_gpt2, tmp_path, caplog):
    kn = KnowledgeNeurons(*tiny_gpt2)
    _run(kn, tmp_path)
    cache = FactCache(tmp_path, "tiny", kn.model, OPTIONS)
    (path,) = cache.folder.glob("*.pt")
    saved = torch.load(path, weights_only=True)
    torch.save({**saved, "scores": saved["scores"][:1]}, path)
    with caplog.at_level(logging.WARNING):
        assert cache.load(FACT) is None
    assert "holds [1, 2] prompts, the fact has 2" in caplog.text


def test_a_mean_baseline_over_other_facts_is_not_reused(tiny_gpt2, tmp_path, caplog):
    """The mean baseline depends on the facts it averages over, which the options do not name: a run over other
    facts must not take this fact's scores from the cache."""
    kn = KnowledgeNeurons(*tiny_gpt2)
    options = Options(steps=2, baseline="mean")
    other = Fact("capital_italy", "capital_of", "Italy", "Rome", ("The capital of Italy is", "Italy's capital is"))
    alone = find_knowledge_neurons(kn, [FACT], options, "tiny", tmp_path, progress=False).facts[0]
    with caplog.at_level(logging.INFO):
        both = find_knowledge_neurons(kn, [FACT, other], options, "tiny", tmp_path, progress=False).facts[0]
    assert "reused" not in caplog.text
    assert not torch.allclose(both.scores, alone.scores)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = find_knowledge_neurons(kn, [FACT, other], options, "tiny", tmp_path, progress=False).facts[0]
    assert "reused 2 of 2 facts" in caplog.text
    assert torch.equal(again.scores, both.scores)


TRACE_FACTS = [Fact("capital_france", "capital_of", "France", "Paris", ("The capital of France is",)),
               Fact("capital_china", "capital_of", "China", "Beijing", ("The capital of China is",))]
TRACE = TraceOptions(samples=2, window=2, knockout_window=1, random_draws=2, bootstrap=10)
REFINED = {"capital_france": [(0, 1, 0.5), (1, 3, 0.2)], "capital_china": [(2, 7, 0.4)]}


def _trace(model, cache_dir, options=TRACE, resume=True):
    return trace_model(*model, TRACE_FACTS, REFINED, options, progress=False, label="tiny", cache_dir=cache_dir,
                       resume=resume)


def test_trace_stage_resumes_from_its_cache(tiny_gpt2, tmp_path, caplog, monkeypatch):
    first = _trace(tiny_gpt2, tmp_path)
    assert len(list(tmp_path.glob("tiny-trace-*/*.json"))) == 2
    with caplog.at_level(logging.INFO):
        fresh = _trace(tiny_gpt2, tmp_path, resume=False)  # --fresh: traced again
    assert "reused" not in caplog.text and json.dumps(fresh) == json.dumps(first)
    monkeypatch.setattr(CausalTracer, "trace", lambda *args, **kwargs: pytest.fail("traced again"))
    with caplog.at_level(logging.INFO):
        again = _trace(tiny_gpt2, tmp_path)
    assert "reused 2 of 2 traced facts" in caplog.text
    assert json.dumps(again) == json.dumps(first)  # every number, the summary from the cached records too


@pytest.mark.parametrize("change", [{"samples": 3}, {"window": 1}, {"seed": 1}, {"noise": 0.5},
                                    {"corruption": "swap"}, {"knockout_window": 2}])
def test_trace_cache_is_not_reused_when_the_numbers_change(tiny_gpt2, tmp_path, caplog, change):
    first = _trace(tiny_gpt2, tmp_path)
    with caplog.at_level(logging.INFO):
        other = _trace(tiny_gpt2, tmp_path, dataclasses.replace(TRACE, **change))
    assert "reused" not in caplog.text
    assert json.dumps(other["facts"]) != json.dumps(first["facts"])
