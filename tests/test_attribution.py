"""Integrated gradients: the staircase agrees with the reference, with captum, and with completeness."""

from __future__ import annotations

import copy

import pytest
import torch
from captum.attr import IntegratedGradients

from common.errors import UserError
from common.tokens import encode
from knowledge_neurons import IG_METHODS, KnowledgeNeurons, coarse_neurons, quadrature, refined_neurons

PROMPT = "The longest river in China is the"
ANSWER = "Yangtze"  # several tokens with the tiny tokenizer: exercises teacher forcing


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("ig_method", ["riemann_left", "gausslegendre"])
def test_fast_equals_reference(tiny_model, ig_method):
    kn = KnowledgeNeurons(*tiny_model)
    fast = kn.attribute_detailed(PROMPT, ANSWER, steps=8, ig_method=ig_method)
    ref = kn.attribute_detailed(PROMPT, ANSWER, steps=8, ig_method=ig_method, method="reference")
    assert len(fast.answer_ids) >= 3
    assert fast.scores.shape == (kn.n_layers, kn.width)
    assert rel_diff(fast.scores, ref.scores) <= 1e-5
    assert torch.allclose(fast.delta, ref.delta, atol=1e-6)
    assert torch.allclose(fast.probs, ref.probs, rtol=1e-5)


def test_attribute_many_equals_one_at_a_time(tiny_model):
    """Prompts of different lengths (one of a single token) and answers of several tokens in one batch."""
    kn = KnowledgeNeurons(*tiny_model)
    one_token = kn.tokenizer.decode(kn.tokenizer("The")["input_ids"][:1])
    items = [(PROMPT, ANSWER), ("The capital of France is", "Paris"), (one_token, "Paris"),
             ("The Eiffel Tower is located in the city of", "Paris")]
    alone = [kn.attribute_detailed(p, a, steps=5, ig_method="riemann_trapezoid") for p, a in items]
    for batch_size in (None, 7):
        together = kn.attribute_many(items, steps=5, ig_method="riemann_trapezoid", batch_size=batch_size)
        assert len(together) == len(items)
        for a, b in zip(alone, together, strict=True):
            assert (a.prompt_ids, a.answer_ids) == (b.prompt_ids, b.answer_ids)
            assert rel_diff(b.scores, a.scores) <= 1e-5
            assert torch.allclose(b.delta, a.delta, atol=1e-6)
            assert torch.allclose(b.probs, a.probs, rtol=1e-5)


def test_one_token_prompt(tiny_model):
    """No position before the answer position: the prefix state is empty (zeros)."""
    kn = KnowledgeNeurons(*tiny_model)
    prompt = kn.tokenizer.decode(kn.tokenizer("The")["input_ids"][:1])
    assert len(kn.tokenizer(prompt)["input_ids"]) == 1
    fast = kn.attribute(prompt, "Paris", steps=4)
    ref = kn.attribute(prompt, "Paris", steps=4, method="reference")
    assert rel_diff(fast, ref) <= 1e-5


def test_fast_equals_reference_float64_and_chunked(tiny_model):
    model, tok = tiny_model
    kn = KnowledgeNeurons(model.double(), tok)
    try:
        whole = kn.attribute(PROMPT, ANSWER, steps=6)
        chunked = kn.attribute(PROMPT, ANSWER, steps=6, batch_size=5)
        ref = kn.attribute(PROMPT, ANSWER, steps=6, method="reference", batch_size=4)
    finally:
        model.float()
    assert whole.dtype == torch.float64
    assert rel_diff(chunked, whole) <= 1e-12
    assert rel_diff(whole, ref) <= 1e-6  # transformers' Mamba scan runs partly in float32


def test_completeness_delta_shrinks_with_steps(tiny_model):
    kn = KnowledgeNeurons(*tiny_model)
    deltas = [kn.attribute_detailed(PROMPT, "Paris", steps=m).delta.abs().max().item() for m in (5, 20, 80)]
    assert deltas[0] > deltas[1] > deltas[2]
    assert deltas[2] < deltas[0] / 8  # left Riemann sum: error ~ 1/steps
    gauss = kn.attribute_detailed(PROMPT, "Paris", steps=20, ig_method="gausslegendre").delta
    assert gauss.abs().max().item() < 1e-5 < deltas[0]


def test_layer_scores_match_captum(tiny_model):
    """One layer's scores against captum's IntegratedGradients over a hook-patched forward function."""
    model, tok = tiny_model
    kn = KnowledgeNeurons(model, tok)
    prompt_ids, (target, *_) = encode(tok, PROMPT, "Paris")
    ids = torch.tensor([prompt_ids])
    layer = 1
    acts = kn.activations(PROMPT)[layer]

    def prob_with_layer_set_to(s: torch.Tensor) -> torch.Tensor:  # s: (batch, width) -> (batch,)
        def patch(module, args):
            x = args[0].expand(len(s), -1, -1)
            return (torch.cat([x[:, :-1], s[:, None]], dim=1),)

        handle = kn.adapter.neuron_module(layer).register_forward_pre_hook(patch)
        try:
            return model(ids, use_cache=False).logits[:, -1].softmax(-1)[:, target]
        finally:
            handle.remove()

    ours = kn.attribute(PROMPT, "Paris", steps=12, ig_method="riemann_middle")[layer]
    theirs = IntegratedGradients(prob_with_layer_set_to).attribute(
        acts[None], baselines=torch.zeros_like(acts[None]), n_steps=12, method="riemann_middle"
    )[0]
    assert rel_diff(ours, theirs) <= 1e-5


def test_baseline_equal_to_activation_gives_zero_scores(tiny_model):
    kn = KnowledgeNeurons(*tiny_model)
    acts = kn.activations(PROMPT)
    result = kn.attribute_detailed(PROMPT, "Paris", steps=4, baseline=acts)
    assert result.scores.abs().max().item() == 0.0
    assert result.delta.abs().max().item() < 1e-6


def test_mean_baseline_completeness(tiny_model):
    kn = KnowledgeNeurons(*tiny_model)
    prompts = ("The capital of France is", "The Eiffel Tower is in", "The")
    one_by_one = torch.stack([kn.activations(p) for p in prompts])
    for batch in (2, 64):  # several forwards of padded prompts, or one
        torch.testing.assert_close(kn.activations_many(prompts, batch=batch), one_by_one, rtol=1e-4, atol=1e-5)
    base = one_by_one[:2].mean(0)
    result = kn.attribute_detailed(PROMPT, "Paris", steps=16, ig_method="gausslegendre", baseline=base)
    assert result.scores.abs().max().item() > 0
    assert result.delta.abs().max().item() < 1e-5


@pytest.mark.parametrize("method", IG_METHODS)
def test_quadrature_rules(method):
    alphas, weights = quadrature(method, 10)
    assert alphas.min() >= 0 and alphas.max() <= 1
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    exact_degree = {"riemann_middle": 1, "riemann_trapezoid": 1, "gausslegendre": 19}.get(method, 0)
    for degree in range(exact_degree + 1):
        assert (weights * alphas**degree).sum().item() == pytest.approx(1 / (degree + 1), abs=1e-12)


def test_quadrature_rejects_bad_input():
    with pytest.raises(UserError, match="unknown"):
        quadrature("simpson", 10)
    with pytest.raises(UserError, match="too small"):
        quadrature("riemann_trapezoid", 1)


def test_coarse_and_refined_neurons():
    s1 = torch.tensor([[1.0, 0.1, 0.0], [0.5, -2.0, 0.25]])
    s2 = torch.tensor([[0.9, 0.0, 0.3], [0.1, 0.0, 0.05]])
    s3 = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    assert coarse_neurons(s1, 0.2) == [(0, 0, 1.0), (1, 0, 0.5), (1, 2, 0.25)]
    assert coarse_neurons(-s1.abs(), 0.2) == []
    # (0,0) in s1, s2; (0,2) in s2, s3; (1,0), (1,2) only in s1
    refined = refined_neurons([s1, s2, s3], threshold=0.2, share=0.5)
    assert [(layer, i) for layer, i, _ in refined] == [(0, 0), (0, 2)]
    assert refined[0][2] == pytest.approx((1.0 + 0.9 + 0.0) / 3)
    assert refined_neurons([s1, s2, s3], threshold=0.2, share=0.9) == []
    assert refined_neurons([s1], threshold=0.2, share=0.5) == []  # needs >= 2 prompts


def test_neuron_methods_threshold_the_scores(tiny_mamba):
    kn = KnowledgeNeurons(*tiny_mamba)
    prompts = [PROMPT, "China's longest river is the", "The longest river of China is the"]
    scores = [kn.attribute(p, ANSWER, steps=4) for p in prompts]
    assert kn.get_coarse_neurons(PROMPT, ANSWER, threshold=0.3, steps=4) == coarse_neurons(scores[0], 0.3)
    refined = kn.get_refined_neurons(prompts, ANSWER, threshold=0.3, share=0.6, steps=4)
    assert refined == refined_neurons(scores, 0.3, 0.6)
    assert refined  # the tiny model shares some neurons across these paraphrases


def test_model_in_training_mode_is_attributed_in_eval_mode_and_left_as_it_was(tiny_gpt2):
    model, tok = tiny_gpt2
    assert model.config.resid_pdrop > 0  # dropout would make the scores random
    expected = KnowledgeNeurons(model, tok).attribute(PROMPT, "Paris", steps=4)
    model.train()
    try:
        kn = KnowledgeNeurons(model, tok)
        assert torch.equal(kn.attribute(PROMPT, "Paris", steps=4), expected)
        assert model.training
    finally:
        model.eval()


def test_models_as_users_load_them(tmp_path, tiny_model):
    """Weights loaded with from_pretrained require grad: attribution works and leaves the model as it was."""
    from transformers import AutoModelForCausalLM

    model, tok = tiny_model
    model.save_pretrained(tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(p.requires_grad for p in theirs.parameters())
    expected = KnowledgeNeurons(model, tok).attribute(PROMPT, ANSWER, steps=4)
    got = KnowledgeNeurons(theirs, tok).attribute(PROMPT, ANSWER, steps=4)
    assert rel_diff(got, expected) <= 1e-6
    assert all(p.requires_grad and p.grad is None for p in theirs.parameters())


def test_bad_inputs_are_user_errors(tiny_gpt2):
    kn = KnowledgeNeurons(*tiny_gpt2)
    with pytest.raises(UserError, match="empty prompt"):
        kn.attribute("  ", "Paris")
    with pytest.raises(UserError, match="tokenizes to nothing"):
        kn.attribute(PROMPT, "")
    with pytest.raises(UserError, match="unknown attribution method"):
        kn.attribute(PROMPT, "Paris", method="slow")


def test_non_finite_scores_name_the_fact(tiny_gpt2):
    model, tok = tiny_gpt2
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.transformer.h[1].mlp.c_proj.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="fact capital_x: attribution scores are not finite"):
        KnowledgeNeurons(broken, tok).attribute_detailed(PROMPT, "Paris", steps=2, name="fact capital_x")


def test_unsupported_architecture_is_a_user_error():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=50)
    with pytest.raises(UserError, match="llama"):
        KnowledgeNeurons(LlamaForCausalLM(cfg), tokenizer=None)


def test_gpt_neox_without_parallel_residual(tiny_neox):
    """Pythia uses the parallel residual; the sequential variant (m = x + attn, m + mlp(m)) is covered too."""
    from transformers import GPTNeoXForCausalLM

    model, tok = tiny_neox
    torch.manual_seed(1)
    config = model.config.__class__(**{**model.config.to_dict(), "use_parallel_residual": False})
    sequential = GPTNeoXForCausalLM(config)
    kn = KnowledgeNeurons(sequential.eval(), tok)
    fast = kn.attribute(PROMPT, ANSWER, steps=5)
    ref = kn.attribute(PROMPT, ANSWER, steps=5, method="reference")
    assert rel_diff(fast, ref) <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_gives_the_cpu_numbers(tiny_model):
    model, tok = tiny_model
    cpu = KnowledgeNeurons(model, tok).attribute_detailed(PROMPT, ANSWER, steps=8)
    try:
        gpu = KnowledgeNeurons(model.cuda(), tok).attribute_detailed(PROMPT, ANSWER, steps=8)
        ref = KnowledgeNeurons(model, tok).attribute_detailed(PROMPT, ANSWER, steps=8, method="reference")
    finally:
        model.cpu()
    assert rel_diff(gpu.scores, cpu.scores) <= 1e-4
    assert rel_diff(ref.scores, cpu.scores) <= 1e-4


def test_out_of_memory_says_to_lower_the_batch_size(tiny_gpt2, monkeypatch):
    kn = KnowledgeNeurons(*tiny_gpt2)

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(kn, "_staircase", exhausted)
    with pytest.raises(UserError, match="lower --batch-size"):
        kn.attribute(PROMPT, "Paris", steps=2)


def test_prefix_outputs_give_the_full_models_logits_at_each_last_position(tiny_model):
    """The batched clean forward (the base model on right-padded prompts) gives at each prompt's last position
    the block output whose head is the logits of the model's own forward of that prompt alone."""
    model, tokenizer = tiny_model
    adapter = KnowledgeNeurons(model, tokenizer).adapter
    prompts = [torch.tensor(tokenizer(p)["input_ids"]) for p in ("The capital of France is", PROMPT, "The")]
    assert len({len(p) for p in prompts}) == 3
    with torch.no_grad():
        wanted = adapter.head(adapter.prefixes(prompts, states=False).outputs[:, -1])  # (P, vocab)
    alone = torch.cat([model(p[None], use_cache=False).logits[:, -1] for p in prompts])
    torch.testing.assert_close(wanted, alone, rtol=1e-4, atol=1e-5)
