"""The score files (--save-scores): what each mode holds against the scores a plain run keeps, the default, the
atomic write, and the knowledge JSON that names them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from analysis.scores import PROMPT_SCORES_LIMIT, load_scores, save_scores_mode, score_file, what_fits
from analysis.stage import Options, find_knowledge_neurons
from facts import FACTS, relations
from knowledge_neurons import KnowledgeNeurons, coarse_neurons
from main import main

SUBSET = [f for facts in list(relations(FACTS).values())[:2] for f in facts[:2]]
OPTIONS = Options(steps=2)


@pytest.mark.parametrize("mode", ["prompt", "fact"])
def test_score_file_holds_the_scores_a_plain_run_keeps(tiny_gpt2, tmp_path, mode):
    kn = KnowledgeNeurons(*tiny_gpt2)
    kept = find_knowledge_neurons(kn, SUBSET, OPTIONS, "tiny", progress=False)
    with score_file(tmp_path / "s.npz", mode, OPTIONS.threshold) as writer:
        streamed = find_knowledge_neurons(kn, SUBSET, OPTIONS, "tiny", progress=False, scores=writer)
    assert all(r.scores is None for r in streamed.facts)  # the result holds no score tensor
    assert streamed.refined == kept.refined and sum(map(len, kept.refined.values())) > 0
    with np.load(tmp_path / "s.npz") as npz:
        assert len(npz.files) == 3 * len(SUBSET)
        for r in kept.facts:
            if mode == "prompt":
                assert np.array_equal(npz[f"{r.fact.id}/scores"], r.scores.numpy())
            else:
                assert np.array_equal(npz[f"{r.fact.id}/mean_scores"], r.scores.mean(0).numpy())
                for layer, i, score in r.refined:  # the refined neurons' scores are its entries
                    assert npz[f"{r.fact.id}/mean_scores"][layer, i] == np.float32(score)
            assert np.array_equal(npz[f"{r.fact.id}/completeness_delta"], r.delta.numpy())
            rows = [[k, lay, i] for k, s in enumerate(r.scores) for lay, i, _ in coarse_neurons(s, OPTIONS.threshold)]
            assert npz[f"{r.fact.id}/coarse_neurons"].tolist() == rows and rows
            assert [len(coarse_neurons(s, OPTIONS.threshold)) for s in r.scores] == streamed.facts[
                kept.facts.index(r)].n_coarse


def test_a_failed_stage_leaves_no_score_file(tmp_path):
    with pytest.raises(RuntimeError), score_file(tmp_path / "s.npz", "prompt", 0.2) as writer:
        writer.add("f", torch.ones(2, 3, 4), torch.zeros(2, 3))
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_the_default_keeps_every_prompt_while_it_fits():
    per_prompt = 12 * 3072 * 4  # GPT-2-small
    fit = PROMPT_SCORES_LIMIT // per_prompt
    assert what_fits(fit, 12, 3072) == "prompt" and what_fits(fit + 1, 12, 3072) == "fact"
    assert save_scores_mode(None, fit + 1, 12, 3072, "gpt2") == "fact"
    assert save_scores_mode("none", 1, 12, 3072, "gpt2") == "none"


def _facts_file(path):
    path.write_text("\n".join(json.dumps({"id": f.id, "relation": f.relation, "subject": f.subject,
                                          "answer": f.answer, "prompts": list(f.prompts)}) for f in SUBSET))
    return str(path)


def test_save_scores_option_and_resume(tiny_gpt2, tiny_mamba, tmp_path):
    """fact, then prompt (resumed from the cache: the same numbers), then none, which removes the earlier file."""
    out = tmp_path / "out"
    args = ["knowledge", "--gpt2-model", tiny_gpt2[0].config._name_or_path, "--mamba-model",
            tiny_mamba[0].config._name_or_path, "--facts", _facts_file(tmp_path / "f.jsonl"), "--out", str(out),
            "--steps", "2", "-q"]
    docs, arrays = {}, {}
    for mode in ("fact", "prompt", "none"):
        assert main([*args, "--save-scores", mode]) == 0
        docs[mode] = json.loads((out / "gpt2_knowledge_neurons.json").read_text())
        with load_scores(out / "gpt2_knowledge_neurons.json") as scores:
            arrays[mode] = {k: scores[k] for k in scores}
    assert docs["fact"]["options"]["save_scores"] == "fact"
    assert docs["fact"]["scores_files"] == docs["prompt"]["scores_files"] == ["gpt2_knowledge_neurons.npz"]
    assert docs["none"]["scores_files"] == [] and arrays["none"] == {}
    assert not (out / "gpt2_knowledge_neurons.npz").exists()
    assert docs["fact"]["facts"] == docs["prompt"]["facts"] == docs["none"]["facts"]
    for f in SUBSET:
        assert np.array_equal(arrays["fact"][f"{f.id}/mean_scores"], arrays["prompt"][f"{f.id}/scores"].mean(0))
        assert np.array_equal(arrays["fact"][f"{f.id}/coarse_neurons"], arrays["prompt"][f"{f.id}/coarse_neurons"])
    prompt = docs["prompt"]["facts"][0]["prompts"][0]
    assert set(prompt) == {"prompt", "tokens", "p_answer", "p_answer_tokens", "n_coarse_neurons",
                           "max_abs_completeness_delta"}
    assert prompt["n_coarse_neurons"] == int((arrays["prompt"][f"{SUBSET[0].id}/coarse_neurons"][:, 0] == 0).sum())
