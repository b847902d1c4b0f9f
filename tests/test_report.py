"""The report's sentences follow the numbers: p-values at the permutation limit, the demo caveat, and what the
knowledge neurons, relations and interventions show."""

from __future__ import annotations

import pytest
import torch

from analysis.stage import FactResult, ModelResult, Options
from facts import Fact
from models.demo import INFO_FILE
from report import findings
from report.markdown import demo_caveat


@pytest.mark.parametrize(("p", "n", "text"), [
    (1 / 1001, 1000, "p < 0.001 (the smallest possible with 1000 permutations)"),
    (1 / 51, 50, "p < 0.02 (the smallest possible with 50 permutations)"),
    (2 / 1001, 1000, "p = 0.002"),
    (0.0123456, 1000, "p = 0.0123"),
    (None, 1000, "p undefined"),
])
def test_p_value_wording(p, n, text):
    assert findings.p_value({"p_value": p, "n_permutations": n}) == text


def test_demo_caveat_names_the_demo_models(tmp_path):
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / INFO_FILE).write_text("{}")
    assert demo_caveat({"gpt2": "gpt2", "mamba": str(tmp_path)}) is None
    assert demo_caveat({"gpt2": "gpt2", "mamba": str(demo)}) == \
        "mamba: a tiny demo model trained on these very facts, not the real checkpoint"  # the label as given
    assert demo_caveat({"gpt2": str(demo), "mamba": str(demo)}, {"gpt2": "gpt2", "mamba": "mamba"}) == \
        "gpt2 (GPT-2) and mamba (Mamba): tiny demo models trained on these very facts, not the real checkpoints"


def _result(neurons: dict[str, list[tuple[int, int]]], p_answer: float) -> ModelResult:
    """A model result of 4 layers x 8 neurons whose refined neurons are `neurons` (two prompts per fact)."""
    facts = []
    for fact_id, chosen in neurons.items():
        scores = torch.zeros(2, 4, 8)
        for layer, i in chosen:
            scores[:, layer, i] = 1.0
        fact = Fact(fact_id, "r", "S", "A", ("S is", "S was"))
        facts.append(FactResult.of(fact, scores, torch.zeros(2, 4), [torch.tensor([p_answer])] * 2, [[1], [2]], [3],
                                    Options()))
    return ModelResult("folder", "gpt2", "site", 4, 8, Options(), facts)


def test_knowledge_neuron_sentence_counts_and_locates():
    result = _result({"a": [(3, 0), (3, 1), (1, 0)], "b": [(3, 2)], "c": []}, 0.5)
    assert findings.knowledge_neurons("GPT-2", result) == (
        "GPT-2: 4 knowledge neurons over 3 facts (1.33 per fact; 1 fact has none). Layer 3 of 0-3 holds the most "
        "(75 %), and the upper half of the layers holds 75 %.")


def _stats(intra, inter, p):
    return {"permutation_test": {"p_value": p, "n_permutations": 1000},
            "bootstrap": {"intra_jaccard": {"mean": intra}, "inter_jaccard": {"mean": inter}}}


def test_relation_sentence_follows_the_test():
    assert findings.relations("Mamba", _stats(0.2, 0.01, 1 / 1001)) == (
        "Mamba: facts of one relation share more knowledge neurons than facts of different relations: mean Jaccard "
        "0.2 within relations vs 0.01 across them, p < 0.001 (the smallest possible with 1000 permutations).")
    assert "not significant: mean Jaccard 0.2 within relations vs 0.1 across them, p = 0.3." in \
        findings.relations("Mamba", _stats(0.2, 0.1, 0.3))
    assert "do not share more" in findings.relations("Mamba", _stats(0.01, 0.02, 0.9))


def _summary(own, own_sem, rand, rand_sem, amplify):
    cell = {"relative_change_mean": own, "relative_change_sem": own_sem}
    return {"suppress": {"knowledge_neurons": cell,
                         "random_neurons": {"relative_change_mean": rand, "relative_change_sem": rand_sem}},
            "amplify": {"knowledge_neurons": {"relative_change_mean": amplify}}}


def test_intervention_sentences_follow_the_numbers():
    result = _result({"a": [(3, 0)], "b": [(2, 1)]}, 0.8)
    lines = findings.interventions("GPT-2", _summary(-0.72, 0.05, -0.007, 0.002, -0.12), result)
    assert lines[0] == ("GPT-2: suppressing a fact's knowledge neurons changes P(answer) by -72 % on average, as many "
                        "random neurons from the same layers by -0.7 %; the knowledge neurons matter more than random "
                        "ones (by more than two standard errors).")
    # amplifying lowers P(answer): the reason given is computed from the clean P(answer) = 0.8, (1 - P) / P = 25 %
    assert "amplifying (x2) the knowledge neurons lowers P(answer) too (-12 %)" in lines[1]
    assert "averages 0.8, so it could rise by at most 25 %" in lines[1]
    unclear = findings.interventions("GPT-2", _summary(-0.1, 0.05, -0.05, 0.05, 0.3), result)
    assert "within two standard errors" in unclear[0]
    assert unclear[1] == "GPT-2: amplifying (x2) the knowledge neurons raises P(answer) by 30 %."
    assert "do not lower P(answer) more" in findings.interventions("GPT-2", _summary(0.0, 0.0, -0.1, 0.0, None),
                                                                   result)[0]
