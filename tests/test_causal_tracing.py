"""Causal tracing and knockout: the batched path against hooked full forwards, and exact identities."""

from __future__ import annotations

import copy

import pytest
import torch

from attention_neurons import _alpha
from causal_tracing import SITES, CausalTracer
from common.errors import UserError
from common.tokens import subject_positions

PROMPT, ANSWER, SUBJECT = "The capital of France is", " Paris", "France"
PROMPT2, SUBJECT2 = "The Eiffel Tower is located in the city of", "Eiffel Tower"
# tolerances rel 1e-6: transformers computes Mamba's A and Mamba-2's gated norm in float32 even in float64 models


@pytest.fixture(scope="module")
def tracer64(tiny_model):
    model, tok = tiny_model
    return CausalTracer(copy.deepcopy(model).double(), tok)  # a copy: the fixture is shared


@pytest.mark.parametrize("window", [1, 10])
def test_fast_equals_reference_noise(tracer64, window):
    fast = tracer64.trace(PROMPT2, ANSWER, SUBJECT2, samples=3, seed=1, window=window, batch_size=5)
    ref = tracer64.trace(PROMPT2, ANSWER, SUBJECT2, samples=3, seed=1, window=window, method="reference")
    assert fast.p_corrupt == pytest.approx(ref.p_corrupt, rel=1e-6)
    for site in SITES:
        torch.testing.assert_close(getattr(fast, site), getattr(ref, site), rtol=1e-6, atol=1e-12)
    assert not torch.allclose(fast.residual, torch.full_like(fast.residual, fast.p_corrupt))  # restorations matter


PLACES = {  # the subject at the start, in the middle of a longer prompt (several Mamba-2 SSD chunks), at the end
    "first": ("Eiffel Tower is located in the city of", "Eiffel Tower"),
    "middle": ("The river is the Yangtze. The Eiffel Tower is in the city of", "Eiffel Tower"),
    "last": ("The capital of France is the city of the Eiffel Tower", "Eiffel Tower"),
}


@pytest.mark.parametrize("place", list(PLACES))
def test_fast_equals_reference_wherever_the_subject_is(tracer64, place):
    """Each fast row runs only the positions from its restored one, from the corrupted runs' states before it:
    restorations at the first position (nothing before), far into a long prompt, at the last position."""
    prompt, subject = PLACES[place]
    fast = tracer64.trace(prompt, ANSWER, subject, samples=2, seed=2, window=2)
    ref = tracer64.trace(prompt, ANSWER, subject, samples=2, seed=2, window=2, method="reference")
    assert (fast.subject[0] == 0) == (place == "first")
    assert (fast.subject[-1] == len(fast.tokens) - 1) == (place == "last")
    for site in SITES:
        torch.testing.assert_close(getattr(fast, site), getattr(ref, site), rtol=1e-6, atol=1e-12)


def test_fast_equals_reference_swap(tracer64):
    kw = dict(corruption="swap", swap_subject="China", window=2)
    fast = tracer64.trace(PROMPT, ANSWER, SUBJECT, **kw)
    ref = tracer64.trace(PROMPT, ANSWER, SUBJECT, method="reference", **kw)
    for site in SITES:
        torch.testing.assert_close(getattr(fast, site), getattr(ref, site), rtol=1e-6, atol=1e-12)
    assert fast.p_corrupt != pytest.approx(fast.p_clean)


def test_restoring_last_block_output_gives_clean(tracer64):
    t = tracer64.trace(PROMPT2, ANSWER, SUBJECT2, samples=2, seed=0, window=1)
    assert t.residual[-1, -1].item() == pytest.approx(t.p_clean, rel=1e-6)
    # restoring every subject position's block-0 output undoes a noise that only touched the subject embeddings
    assert t.p_corrupt != pytest.approx(t.p_clean, abs=1e-9)


def test_seeded_noise_reproducible(tracer64):
    a = tracer64.trace(PROMPT, ANSWER, SUBJECT, samples=2, seed=3, window=1)
    b = tracer64.trace(PROMPT, ANSWER, SUBJECT, samples=2, seed=3, window=1)
    c = tracer64.trace(PROMPT, ANSWER, SUBJECT, samples=2, seed=4, window=1)
    assert torch.equal(a.residual, b.residual) and a.p_corrupt == b.p_corrupt
    assert a.p_corrupt != c.p_corrupt


def test_bad_subjects_are_user_errors(tracer64):
    with pytest.raises(UserError, match="does not occur"):
        tracer64.trace(PROMPT, ANSWER, "Germany", samples=1)
    with pytest.raises(UserError, match="same positions"):
        tracer64.trace(PROMPT, ANSWER, SUBJECT, corruption="swap", swap_subject="the Yangtze river of China")


def test_knockout_of_nothing_is_clean(tracer64):
    ids = torch.tensor(tracer64.tokenizer(PROMPT2)["input_ids"])
    target = tracer64.tokenizer(ANSWER)["input_ids"][0]
    ad = tracer64.adapter
    inputs, _, logits = ad.block_io(ids)
    nothing = torch.zeros(len(ids), dtype=torch.bool)
    p = tracer64.knocked_out(inputs, target, nothing, range(ad.n_layers))
    # rel 1e-6: Mamba-2's gated RMSNorm computes in float32 inside the real model, even in a float64 model
    assert p == pytest.approx(logits.softmax(-1)[0, target].item(), rel=1e-6, abs=1e-12)
    ko = tracer64.knockout(PROMPT2, ANSWER, SUBJECT2, window=1)
    assert ko.shape == (ad.n_layers,) and not torch.allclose(ko, torch.full_like(ko, p))


def test_mamba_knockout_equals_removed_hidden_attention_terms(tiny_mamba):
    """Independently: the real model's forward, with the subject's terms alpha[T-1, s] x_s silu(z_{T-1}) taken off
    the last position's out_proj input in the window layers (alpha by attention_neurons' full hidden attention)."""
    model, tok = tiny_mamba
    model = copy.deepcopy(model).double()
    tracer = CausalTracer(model, tok)
    ad = tracer.adapter
    ids = tok(PROMPT2)["input_ids"]
    target = tok(ANSWER)["input_ids"][0]
    subject = subject_positions(tok, PROMPT2, SUBJECT2)
    ko = tracer.knockout(PROMPT2, ANSWER, SUBJECT2, window=1)
    clean = model(torch.tensor([ids]), use_cache=False).logits[0, -1].softmax(-1)[target].item()
    assert (ko - clean).abs().max().item() > 1e-4 * clean  # the knockout changes P, far beyond the tolerance
    for layer in range(ad.n_layers):
        expected = _without_subject_terms(model, ad, layer, ids, subject, target)
        assert ko[layer].item() == pytest.approx(expected, rel=1e-6)


def _without_subject_terms(model, ad, layer, ids, subject, target) -> float:
    """P(target) from the real forward with alpha[T-1, s] x_s silu(z_{T-1}) of the subject positions s taken off
    the last position's out_proj input at `layer`. rel 1e-6 above: the real Mamba scan takes A in float32."""
    block_in = {}

    def grab(module, args, kwargs):
        block_in["x"] = args[0] if args else kwargs["hidden_states"]

    def remove(module, args):
        s = ad.ssm_inputs(layer, block_in["x"][0])
        alpha = _alpha(s, slice(None))[:, -1]  # (d_inner, T) last row
        terms = (alpha[:, subject] * s.u[subject].T).sum(-1)  # (d_inner,)
        a = args[0].clone()
        a[0, -1] -= terms * torch.nn.functional.silu(s.z[-1])
        return (a,)

    handles = [ad.layers[layer].register_forward_pre_hook(grab, with_kwargs=True),
               ad.neuron_module(layer).register_forward_pre_hook(remove)]
    try:
        with torch.no_grad():
            return model(torch.tensor([ids]), use_cache=False).logits[0, -1].softmax(-1)[target].item()
    finally:
        for handle in handles:
            handle.remove()


def test_restoring_no_neurons_is_the_corrupted_run(tracer64):
    p_clean, p_corrupt, p = tracer64.restore_neurons(PROMPT2, ANSWER, SUBJECT2, [[], [(0, 1), (1, 2)]], samples=2)
    t = tracer64.trace(PROMPT2, ANSWER, SUBJECT2, samples=2, window=1)
    assert p[0].item() == pytest.approx(p_corrupt, rel=1e-6) and p_corrupt == pytest.approx(t.p_corrupt, rel=1e-6)
    assert p[1].item() != pytest.approx(p_corrupt, rel=1e-6) and p_clean == pytest.approx(t.p_clean, rel=1e-6)


@pytest.mark.parametrize("option", [["--trace-samples", "0"], ["--trace-window", "0"], ["--noise", "-1"],
                                    ["--corruption", "swap", "--noise", "0.5"]])
def test_bad_trace_options_are_one_line_errors(option, tmp_path, capsys):
    from main import main

    assert main(["trace", *option, "--out", str(tmp_path), "-q"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and option[-2] in err


def test_trace_mode_writes_every_model_and_fact(demo_models, tmp_path):
    import json

    from facts import FACTS, relations
    from main import main

    facts = [f for group in list(relations(FACTS).values())[:2] for f in group[:2]]
    path = tmp_path / "facts.jsonl"
    path.write_text("\n".join(json.dumps({"id": f.id, "relation": f.relation, "subject": f.subject,
                                          "answer": f.answer, "prompts": list(f.prompts)}) for f in facts))
    out = tmp_path / "out"
    assert main(["trace", "--models", f"gpt2={demo_models['gpt2']},mamba={demo_models['mamba']}", "--facts",
                 str(path), "--out", str(out), "-q", "--steps", "4", "--trace-samples", "2", "--random-draws", "2",
                 "--bootstrap", "20", "--trace-window", "3"]) == 0
    for label in ("gpt2", "mamba"):
        text = (out / f"{label}_causal_trace.json").read_text()
        doc = json.loads(text)
        assert "NaN" not in text and doc["versions"]["torch"]
        assert doc["options"]["samples"] == 2 and doc["options"]["window"] == 3 and doc["options"]["noise"] > 0
        assert [r["id"] for r in doc["facts"]] == [f.id for f in facts]
        L = doc["n_layers"]
        for r in doc["facts"]:
            T = len(r["tokens"])
            assert all(len(r[site]) == L and len(r[site][0]) == T for site in SITES)
            assert r["residual"][-1][-1] == pytest.approx(r["p_clean"], rel=1e-4)  # last block, last position
            assert set(r["knockout"]) == {"subject_to_last", "non_subject_to_last", "last_to_last"}
        s = doc["summary"]
        assert all(len(s["aie"][site]) == L and len(s["aie"][site][0]) == 6 for site in SITES)
        assert len(s["knockout"]["subject_to_last"]) == L
        assert set(s["kn_cross_check"]) >= {"restore_kn", "restore_random", "layer_correlation"}
        for path in [*doc["figures"]["heatmaps"], doc["figures"]["aie_curves"]]:
            assert (out / path).stat().st_size > 5000
        assert doc["sampling"] == {"facts": 4, "facts_traced": 4, "trace_facts": 500, "seed": 0}
    assert main(["trace", "--models", f"gpt2={demo_models['gpt2']}", "--facts", str(tmp_path / "facts.jsonl"),
                 "--out", str(out), "-q",
                 "--steps", "4", "--trace-samples", "2", "--random-draws", "2", "--bootstrap", "20", "--trace-window",
                 "3", "--trace-facts", "2", "--seed", "3"]) == 0
    doc = json.loads((out / "gpt2_causal_trace.json").read_text())
    assert doc["sampling"] == {"facts": 4, "facts_traced": 2, "trace_facts": 2, "seed": 3}
    assert len(doc["facts"]) == 2 and {r["id"] for r in doc["facts"]} < {f.id for f in facts}
