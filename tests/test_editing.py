"""Knowledge editing: value slots, the update and erase rules, bit-for-bit restore, the batched scoring, and the
edits on the demo models against random-neuron controls; `python main.py edit` end to end."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from analysis.interventions import edited_answer_probability
from analysis.stage import FactCache, Options, find_knowledge_neurons
from common.errors import UserError
from common.sampling import sample_indices
from editing.edits import EditOptions, erase, new_answers, relation_neurons, restored, update
from editing.evaluation import Probe, Scored, fact_probe, perplexity, perplexity_ratio, run_editing, score
from facts import FACTS, Fact, relations
from knowledge_neurons import KnowledgeNeurons
from main import main
from models import adapter_for, load_model
from sources.neutral_text import SENTENCES

# two relations x two facts: enough for same- vs other-relation effects, small enough to be quick
SUBSET = [f for facts in list(relations(FACTS).values())[:2] for f in facts[:2]]


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_value_slots_are_what_each_neuron_writes(tiny_model):
    model, _ = tiny_model
    ad = adapter_for(model)
    for layer in range(ad.n_layers):
        slots = ad.value_slots(layer)
        assert slots.shape == (ad.width, model.config.hidden_size)
        basis = torch.eye(ad.width, dtype=ad.dtype)
        written = ad.project(layer, basis) - ad.project(layer, torch.zeros_like(basis))  # (width, d_model)
        torch.testing.assert_close(written, slots, rtol=1e-5, atol=1e-6)
        weight = ad.neuron_module(layer).weight
        assert slots.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()  # a view, not a copy


def test_output_embedding_is_the_unembedding_row(tiny_model):
    model, _ = tiny_model
    ad = adapter_for(model)
    h = torch.randn(1, model.config.hidden_size, dtype=ad.dtype)
    logits = model.get_output_embeddings()(h)[0]
    assert logits[7].item() == pytest.approx(float(h[0] @ ad.output_embedding(7)), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("rule", ["dai", "eleuther"])
def test_update_rule_against_the_formula(tiny_model, rule):
    model, _ = tiny_model
    ad = adapter_for(model)
    options = EditOptions(rule=rule, norm_lambda1=1.0, norm_lambda2=8.0)
    layer, i, old, new = 1, 5, 11, 42
    v = ad.value_slots(layer)[i].clone()
    e_old, e_new = ad.output_embedding(old).clone(), ad.output_embedding(new).clone()
    if rule == "dai":
        expected = v - 1.0 * v.norm() / e_old.norm() * e_old + 8.0 * v.norm() / e_new.norm() * e_new
    else:
        expected = v - 2 * e_old + 2 * e_new
    before, slots_before = _weights(model), ad.value_slots(layer).clone()
    with restored(ad, [(layer, i)]):
        update(ad, [(layer, i)], old, new, options)
        torch.testing.assert_close(ad.value_slots(layer)[i], expected, rtol=1e-6, atol=1e-6)
        assert sum(not torch.equal(w, before[k]) for k, w in model.state_dict().items()) == 1
        assert torch.nonzero((ad.value_slots(layer) != slots_before).any(-1)).flatten().tolist() == [i]
    assert _unchanged(model, before)


def test_restored_bit_for_bit_after_update_erase_and_errors(tiny_model):
    model, _ = tiny_model
    ad = adapter_for(model)
    slots = [(0, 3), (1, 7), (2, 0), (2, 9), (0, 3)]  # a repeated slot is edited once and restored once
    before = _weights(model)
    with restored(ad, slots):
        update(ad, slots, 3, 4, EditOptions())
        assert not _unchanged(model, before)
        erase(ad, slots)
        assert all(not ad.value_slots(layer)[i].any() for layer, i in slots)
    assert _unchanged(model, before)
    with pytest.raises(RuntimeError, match="boom"), restored(ad, slots):
        update(ad, slots, 3, 4, EditOptions(rule="eleuther"))
        raise RuntimeError("boom")
    assert _unchanged(model, before)


def test_adapter_logits_are_the_models_with_padding_and_hooks(tiny_model):
    """`Adapter.logits` (state-space models: recomputed with their own scan) equals the model's own forward at
    every position a right-padded prompt has, also with a hook scaling neurons (as editing and interventions do)."""
    model, _ = tiny_model
    ad = adapter_for(model)
    torch.manual_seed(0)
    lengths = [9, 1, 5, 9]
    ids = torch.randint(1, model.config.vocab_size, (len(lengths), max(lengths)))
    mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
    scales = torch.rand(len(lengths), 1, ad.width) * 2
    rows = {"now": slice(None)}  # the rows of `scales` the hook applies

    def hook(module, args):
        return (args[0] * scales[rows["now"]],)

    for hooked in (False, True):
        handle = ad.neuron_module(1).register_forward_pre_hook(hook) if hooked else None
        try:
            with torch.no_grad():
                rows["now"] = slice(None)
                ours = ad.logits(ids, mask)
                for row, n in enumerate(lengths):  # each prompt alone, unpadded: the reference
                    rows["now"] = slice(row, row + 1)
                    alone = model(ids[row : row + 1, :n], use_cache=False).logits[0]
                    torch.testing.assert_close(ours[row, :n], alone, rtol=1e-4, atol=1e-4)
        finally:
            if handle is not None:
                handle.remove()


def test_score_equals_one_full_model_forward_per_probe(demo_kn):
    """The batched score through `Adapter.logits` against the straightforward path: one forward of the model
    itself per probe, log-softmax in float64."""
    _, kn = demo_kn
    probes = [fact_probe(kn.tokenizer, f, p, f.answer) for f in SUBSET for p in f.prompts]
    probes += [Probe(kn.tokenizer(s, add_special_tokens=False)["input_ids"], 1) for s in SENTENCES[:6]]
    for probe, s in zip(probes, score(kn, probes), strict=True):
        ids = torch.tensor([probe.tokens[:-1]])
        with torch.no_grad():
            logp = kn.model(ids, use_cache=False).logits[0].double().log_softmax(-1)[probe.start - 1:]
        targets = torch.tensor(probe.tokens[probe.start:])
        np.testing.assert_allclose(s.logp, logp[torch.arange(len(targets)), targets].numpy(), rtol=1e-4, atol=1e-4)
        assert np.array_equal(s.top1, logp.argmax(-1).numpy())


def test_relation_neurons_are_the_most_frequent():
    refined = {"a": [(0, 1, 0.5), (1, 2, 0.1)], "b": [(0, 1, 0.3), (2, 4, 0.2)], "c": [(2, 4, 0.1), (0, 1, 0.9)],
               "other": [(3, 3, 1.0)] * 5}
    assert relation_neurons(refined, ["a", "b", "c"], 2) == [(0, 1), (2, 4)]
    assert relation_neurons(refined, ["a", "b", "c"], 20) == [(0, 1), (2, 4), (1, 2)]


def test_new_answer_leaves_the_attribution_cache_key(tiny_gpt2, tmp_path):
    cache = FactCache(tmp_path, "m", tiny_gpt2[0], Options())
    fact = FACTS[0]
    assert cache._path(fact) == cache._path(dataclasses.replace(fact, new_answer="Rome"))
    assert cache._path(fact) != cache._path(dataclasses.replace(fact, answer="Rome"))


def test_perplexity_ratio_is_the_exponentiated_mean_nll_difference():
    before = [Scored(np.log([0.5, 0.25]), np.zeros(2)), Scored(np.log([0.1]), np.zeros(1))]
    after = [Scored(np.log([0.25, 0.25]), np.zeros(2)), Scored(np.log([0.1]), np.zeros(1))]
    assert perplexity(before) == pytest.approx((0.5 * 0.25 * 0.1) ** (-1 / 3))
    assert perplexity_ratio(before, before) == 1.0
    assert perplexity_ratio(after, before) == pytest.approx(perplexity(after) / perplexity(before))
    assert perplexity_ratio(after, before) == pytest.approx(np.exp(np.log(2) / 3))


# ----------------------------------------------------------------------------------------------------------
# on the demo models


@pytest.fixture(scope="module", params=["gpt2", "mamba"])
def demo_kn(request, demo_models):
    model, tokenizer = load_model(str(demo_models[request.param]))
    return request.param, KnowledgeNeurons(model, tokenizer)


def test_score_matches_single_forwards_and_interventions(demo_kn):
    """Right-padded batches give each probe what it gets alone, and P(answer) as interventions computes it."""
    _, kn = demo_kn
    facts = SUBSET[:3]
    probes = [fact_probe(kn.tokenizer, f, p, f.answer) for f in facts for p in f.prompts[:2]]
    probes.append(Probe(kn.tokenizer(SENTENCES[0], add_special_tokens=False)["input_ids"], 1))
    batched = score(kn, probes)
    for probe, s in zip(probes, batched, strict=True):
        alone = score(kn, [probe])[0]
        np.testing.assert_allclose(s.logp, alone.logp, rtol=1e-4, atol=1e-5)
        assert np.array_equal(s.top1, alone.top1)
    for probe, s in zip(probes[:-1], batched[:-1], strict=True):
        prompt, answer = probe.tokens[: probe.start], probe.tokens[probe.start:]
        p, top = edited_answer_probability(kn, prompt, answer, torch.ones(1, kn.n_layers, kn.width))
        assert s.p == pytest.approx(p[0].item(), rel=1e-4)
        assert np.array_equal(s.top1, top[0].numpy())


def test_new_answers_come_from_the_relation_or_the_file(demo_kn):
    _, kn = demo_kn
    authors = relations(FACTS)["author_of"]  # Shakespeare x3, Cervantes, Tolstoy
    answers = new_answers(authors, kn.tokenizer)
    assert answers["author_romeo_and_juliet"] == ("Cervantes", "answer of author_don_quixote")
    assert answers["author_hamlet"] == ("Cervantes", "answer of author_don_quixote")
    assert answers["author_war_and_peace"] == ("Shakespeare", "answer of author_romeo_and_juliet")  # wraps around
    lone = Fact("lone", "only_one", "France", "Paris", ("The capital of France is",))
    given = Fact("given", "also_one", "Italy", "Rome", ("The capital of Italy is",), new_answer="Tokyo")
    assert new_answers([lone, given], kn.tokenizer) == {"lone": None, "given": ("Tokyo", "facts file")}
    with pytest.raises(UserError, match="same token"):
        new_answers([Fact("x", "r", "Italy", "Rome", ("The capital of Italy is",), new_answer="Rome!")],
                    kn.tokenizer)


@pytest.fixture(scope="module")
def demo_editing(demo_kn):
    arch, kn = demo_kn
    result = find_knowledge_neurons(kn, SUBSET, Options(steps=10), arch, progress=False)
    before = _weights(kn.model)
    doc = run_editing(kn, result, EditOptions(random_draws=2), progress=False, neutral=SENTENCES[:5])
    return arch, kn, before, doc


def test_editing_leaves_the_weights_bit_for_bit(demo_editing):
    _, kn, before, _ = demo_editing
    assert _unchanged(kn.model, before)


def test_kn_updates_are_more_reliable_than_random(demo_editing):
    arch, _, _, doc = demo_editing
    s = doc["summary"]["update"]
    print(arch, json.dumps(s))
    assert set(s) == {"knowledge_neurons", "random_neurons"}
    assert set(s["knowledge_neurons"]) == {"reliability", "generalization", "locality", "perplexity_ratio"}
    assert doc["details"]["facts_edited"] >= len(SUBSET) - 1
    assert s["knowledge_neurons"]["reliability"] >= s["random_neurons"]["reliability"] + 0.2
    details = doc["details"]
    assert details["update"]["knowledge_neurons"]["p_new_answer_after"] > details["update_p_new_answer_before"]


def test_erasing_hits_its_relation_harder_than_random_and_others(demo_editing):
    arch, _, _, doc = demo_editing
    s = doc["summary"]["erase"]
    print(arch, json.dumps(s))
    kn, rand = s["knowledge_neurons"], s["random_neurons"]
    assert kn["relation_p_change"] < 0
    assert kn["relation_p_change"] < rand["relation_p_change"] - 0.05
    assert kn["relation_p_change"] < kn["other_relations_p_change"] - 0.05
    for row in doc["erase"]["per_relation"]:
        assert 0 < row["n_neurons"] <= 20


def test_edit_mode_end_to_end(demo_models, tmp_path, capsys):
    facts = tmp_path / "facts.jsonl"
    # the lone landmark fact has no other answer in its relation: it is reported as skipped
    rows = [{"id": f.id, "relation": f.relation, "subject": f.subject, "answer": f.answer,
             "prompts": list(f.prompts)} for f in SUBSET[:3]]
    rows[1]["new_answer"] = "Tokyo"
    facts.write_text("\n".join(json.dumps(r) for r in rows))
    out, saved = tmp_path / "out", tmp_path / "edited"
    assert main(["edit", "--gpt2-model", str(demo_models["gpt2"]), "--mamba-model", str(demo_models["mamba"]),
                 "--facts", str(facts), "--out", str(out), "-q", "--steps", "8", "--random-draws", "1",
                 "--edit-rule", "eleuther", "--erase-top", "5", "--save-edited", str(saved)]) == 0
    assert "Knowledge editing" in capsys.readouterr().out
    assert (out / "figures" / "knowledge_editing.png").stat().st_size > 5000
    for label in ("gpt2", "mamba"):
        text = (out / f"{label}_knowledge_editing.json").read_text()
        doc = json.loads(text)
        assert "NaN" not in text
        assert doc["demo_model"] and doc["seed"] == 0 and doc["versions"]["torch"]
        assert doc["arguments"]["mode"] == "edit" and doc["options"]["editing"]["rule"] == "eleuther"
        assert {k: {c: set(v) for c, v in op.items()} for k, op in doc["summary"].items()} == {
            "update": {c: {"reliability", "generalization", "locality", "perplexity_ratio"}
                       for c in ("knowledge_neurons", "random_neurons")},
            "erase": {c: {"relation_p_change", "other_relations_p_change", "perplexity_ratio"}
                      for c in ("knowledge_neurons", "random_neurons")},
        }
        per_fact = {r["fact"]: r for r in doc["update"]["per_fact"]}
        given = per_fact[rows[1]["id"]]
        if "skipped" not in given:
            assert (given["new_answer"], given["new_answer_source"]) == ("Tokyo", "facts file")
        assert per_fact[rows[2]["id"]]["skipped"].startswith("no other answer in its relation")
        assert set(doc["update"]["per_relation"]) <= {rows[0]["relation"]}
        assert [r["relation"] for r in doc["erase"]["per_relation"]] == [rows[0]["relation"], rows[2]["relation"]]
        assert all(r["n_neurons"] <= 5 for r in doc["erase"]["per_relation"])

        # the saved copy holds exactly the reported edit of the first edited fact
        info = doc["saved_edited_model"]
        edited, tokenizer = load_model(info["folder"])
        original, _ = load_model(str(demo_models[label]))
        row = per_fact[info["fact"]]
        kn = KnowledgeNeurons(edited, tokenizer)
        fact = next(f for f in SUBSET if f.id == info["fact"])
        top = [s.top1[0] for s in score(kn, [fact_probe(tokenizer, fact, p, fact.answer) for p in fact.prompts])]
        new = fact_probe(tokenizer, fact, fact.prompts[0], row["new_answer"])
        assert np.mean([t == new.tokens[new.start] for t in top]) == row["knowledge_neurons"]["reliability"]
        ad_edit, ad_orig = adapter_for(edited), adapter_for(original)
        slots = {tuple(s) for s in info["neurons"]}
        for layer in range(ad_edit.n_layers):
            differs = (ad_edit.value_slots(layer) != ad_orig.value_slots(layer)).any(-1)
            assert {(layer, int(i)) for i in torch.nonzero(differs)} == {s for s in slots if s[0] == layer}


def test_sampled_editing_measures_the_sample_and_records_it(demo_editing):
    arch, kn, _, full = demo_editing
    result = find_knowledge_neurons(kn, SUBSET, Options(steps=10), arch, progress=False)
    doc = run_editing(kn, result, EditOptions(random_draws=2, edit_facts=2, locality_prompts=3), progress=False,
                      neutral=SENTENCES[:5])
    s = doc["sampling"]
    assert (s["facts"], s["facts_updated"], s["locality_prompts_measured"]) == (len(SUBSET), 2, 3)
    assert s["prompts"] == sum(len(f.prompts) for f in SUBSET)
    chosen = [SUBSET[i].id for i in sample_indices(len(SUBSET), 2, 0, "edit facts")]
    assert [r["fact"] for r in doc["update"]["per_fact"]] == chosen
    every = {r["fact"]: r for r in full["update"]["per_fact"]}
    assert full["sampling"]["facts_updated"] == len(SUBSET)  # the defaults keep a small run whole
    for row in doc["update"]["per_fact"]:
        if "skipped" in row:
            continue
        own, whole = row["knowledge_neurons"], every[row["fact"]]["knowledge_neurons"]
        # what the sample does not touch is the full run's value; locality is a share of at most 3 prompts
        assert own["reliability"] == whole["reliability"]
        assert own["p_new_answer_after"] == pytest.approx(whole["p_new_answer_after"], rel=1e-5)
        assert any(abs(own["locality"] * m - round(own["locality"] * m)) < 1e-9 for m in (1, 2, 3))


def test_sample_indices_are_seeded_sorted_and_whole_when_small():
    assert sample_indices(5, None, 0, "x").tolist() == [0, 1, 2, 3, 4]
    assert sample_indices(5, 9, 0, "x").tolist() == [0, 1, 2, 3, 4]
    drawn = sample_indices(1000, 10, 3, "x")
    assert len(set(drawn.tolist())) == 10 and drawn.tolist() == sorted(drawn.tolist())
    assert drawn.tolist() == sample_indices(1000, 10, 3, "x").tolist()
    assert drawn.tolist() != sample_indices(1000, 10, 3, "y").tolist()
    with pytest.raises(UserError, match="--edit-facts"):
        EditOptions(edit_facts=0)
