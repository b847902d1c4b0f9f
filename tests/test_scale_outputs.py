"""Outputs of large runs: the console table collapses to relations, the Jaccard figure becomes relation x
relation within the pixel limit, the JSON leaves the pair table out and says so."""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.image import imread

from analysis.stage import TABLE_MAX_FACTS, FactResult, ModelResult, Options, knowledge_tables
from facts import Fact
from report.figures import MAX_PIXELS, plot_relation_jaccard
from run.pipeline import _jaccard_figure, _jaccard_key


def _result(n_facts: int, n_relations: int, seed: int = 0) -> ModelResult:
    """4 layers x 8 neurons, two prompts a fact, refined neurons drawn at random; P(answer) = 0.1 * (fact % 3)."""
    rng = np.random.default_rng(seed)
    facts = []
    for k in range(n_facts):
        scores = torch.zeros(2, 4, 8)
        for flat in rng.choice(32, int(rng.integers(0, 4)), replace=False):
            scores[:, flat // 8, flat % 8] = 1.0
        fact = Fact(f"f{k}", f"P{k % n_relations}", "S", "A", ("S is", "S was"))
        p = torch.tensor([0.1 * (k % 3)])
        facts.append(FactResult.of(fact, scores, torch.zeros(2, 4), [p, p], [[1], [2]], [3], Options()))
    return ModelResult("folder", "gpt2", "site", 4, 8, Options(), facts)


def test_console_table_has_one_row_a_relation_above_the_limit():
    small = knowledge_tables({"GPT-2": _result(TABLE_MAX_FACTS, 3)})
    assert "per fact" in small and "\nf49 " in small.replace("|", " ")
    result = _result(TABLE_MAX_FACTS + 10, 4)
    text = knowledge_tables({"GPT-2": result})
    assert "per relation" in text and "_knowledge_neurons.json" in text
    assert " f55 " not in text.replace("|", " ")
    rows = [line for line in text.splitlines() if line.replace("|", " ").split()[:1] in (["P0"], ["P3"])]
    assert len(rows) == 2
    members = [r for r in result.facts if r.fact.relation == "P0"]
    mean_kn = np.mean([len(result.refined[r.fact.id]) for r in members])
    assert f"{mean_kn:.3g}" in rows[0] and f" {len(members)} " in rows[0].replace("|", " ")


def test_relation_figure_above_the_fact_limit_and_within_the_pixel_limit(tmp_path):
    small, large = _result(20, 3), _result(150, 60)
    assert _jaccard_key("gpt2", small) == "jaccard_gpt2" and _jaccard_key("gpt2", large) == "jaccard_relations_gpt2"
    assert _jaccard_figure(large, "gpt2", tmp_path, None, None).name == "jaccard_relations_gpt2.png"
    many = _result(400, 200)
    image = imread(plot_relation_jaccard(many, "GPT-2", tmp_path / "many.png"))
    assert max(image.shape[:2]) <= MAX_PIXELS
    assert large.overlap["pairs"] is not None and many.overlap["pairs"] is None
    assert "400 facts" in many.overlap["pairs_omitted"]
    assert len(large.overlap["relation_matrix"]["relations"]) == 60
