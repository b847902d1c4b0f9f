"""Hidden attention reproduces the mixers of Mamba, Falcon-Mamba and Mamba-2, token flow sums to the neurons, GPT-2
attention is the model's."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_mamba2_config
from transformers import FalconMambaConfig, FalconMambaForCausalLM, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

from attention_neurons import (
    flow_shares,
    hidden_attention,
    mamba_attention_analysis,
    mean_abs_hidden_attention,
    per_channel,
    segsum,
    subject_mixing,
    token_flow,
)
from common.errors import UserError
from common.tokens import encode
from facts import Fact
from models import adapter_for
from report.attention_figures import plot_hidden_attention, plot_subject_flow, token_labels

FACTS = (
    Fact("capital_france", "capital_of", "France", "Paris", ("The capital of France is", "France's capital is")),
    Fact("river_china", "longest_river", "China", "Yangtze", ("The longest river in China is the",)),
)
REFINED = {"capital_france": [(0, 3, 0.5), (0, 40, 0.2), (2, 10, 0.1)], "river_china": [(1, 5, 0.3)]}


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


SSM_KINDS = ("mamba", "falcon_mamba", "mamba2")
UNITS = {"mamba": 32, "falcon_mamba": 32, "mamba2": 4}  # decay units of the random models: channels or heads


def random_ssm(seed: int, kind: str = "mamba", strong_decay: bool = False, **mamba2_config):
    """2 layers, d_inner 32 (Mamba-2: 4 heads x head_dim 8 in 2 groups, chunks of 4), d_state 4; strong_decay
    makes exp(sum Delta A) underflow float32 within a few steps."""
    torch.manual_seed(seed)
    size = dict(num_hidden_layers=2, hidden_size=16, state_size=4, vocab_size=64)
    if kind == "mamba":
        model = MambaForCausalLM(MambaConfig(intermediate_size=32, **size))
    elif kind == "falcon_mamba":
        model = FalconMambaForCausalLM(FalconMambaConfig(**size))
    else:
        model = Mamba2ForCausalLM(tiny_mamba2_config(num_heads=4, **size, **mamba2_config))
    model.eval().requires_grad_(False)
    if strong_decay:
        for layer in model.backbone.layers:
            layer.mixer.A_log.fill_(5.0)  # A = -148
            bias = layer.mixer.dt_bias if kind == "mamba2" else layer.mixer.dt_proj.bias
            bias.fill_(1.0)  # Delta ~ 1.3: Delta A ~ -200 a step
    return model


def random_mamba(seed: int, strong_decay: bool = False) -> MambaForCausalLM:
    return random_ssm(seed, "mamba", strong_decay)


def mixer_io(model, ids: torch.Tensor, module: str = "out_proj") -> list[torch.Tensor]:
    """The first input of every mixer's `module`, (T, width) per layer, captured by hooks on the real forward.

    module "out_proj": the neurons; "norm" (Mamba-2): the SSM output y before the gated RMSNorm.
    """
    caught: list[torch.Tensor] = []
    hooks = [
        getattr(layer.mixer, module).register_forward_pre_hook(lambda m, args: caught.append(args[0][0]))
        for layer in model.backbone.layers
    ]
    try:
        with torch.no_grad():
            model(ids[None], use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return caught


def out_proj_inputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """The model's own neurons, (T, d_inner) per layer, captured at every mixer's out_proj."""
    return mixer_io(model, ids)


@pytest.mark.parametrize("strong_decay", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", SSM_KINDS)
def test_hidden_attention_reproduces_the_mixer(kind, seed, strong_decay):
    """y_i[c] = sum_j alpha[u(c), i, j] x_j[c] + D x_i[c] is the mixer's own SSM output (Mamba-2: the gated norm's
    input), and y times the adapter's neuron factor is its out_proj input."""
    model = random_ssm(seed, kind, strong_decay)
    adapter = adapter_for(model)
    for T in (1, 2, 5, 17):
        ids = torch.randint(0, 64, (T,))
        theirs = mixer_io(model, ids)
        theirs_y = mixer_io(model, ids, "norm") if kind == "mamba2" else None
        inputs, _, _ = adapter.block_io(ids)
        for layer in range(adapter.n_layers):
            alpha = hidden_attention(model, ids, layer, chunk=3)  # chunks of 3 units: neither 32 nor 4 a multiple
            assert alpha.shape == (UNITS[kind], T, T) and torch.isfinite(alpha).all()
            s = adapter.ssm_inputs(layer, inputs[layer])
            y = torch.einsum("cij,jc->ic", per_channel(s, alpha), s.u) + per_channel(s, s.D) * s.u  # (T, d_inner)
            if theirs_y is not None:
                assert rel_diff(y, theirs_y[layer]) <= 1e-4
            assert rel_diff(y * adapter.neuron_factor(layer, y, s.z), theirs[layer]) <= 1e-4


def test_segsum():
    x = torch.tensor([1.0, 2.0, 4.0, 8.0])
    expected = torch.tensor([[0, -1, -1, -1], [2, 0, -1, -1], [6, 4, 0, -1], [14, 12, 8, 0]]).float()
    expected[expected == -1] = -torch.inf
    assert torch.equal(segsum(x), expected)


def test_alpha_is_causal_and_matches_the_product_of_decays():
    model = random_mamba(3).double()
    adapter = adapter_for(model)
    ids = torch.randint(0, 64, (6,))
    layer = 1
    alpha = hidden_attention(model, ids, layer)
    assert alpha.dtype == torch.float64
    assert torch.equal(torch.triu(alpha, diagonal=1), torch.zeros_like(alpha))
    s = adapter.ssm_inputs(layer, adapter.block_io(ids)[0][layer])
    for d, i, j in [(0, 5, 0), (7, 5, 2), (31, 3, 3), (12, 4, 1), (20, 1, 0)]:
        decay = torch.ones(s.A.shape[1], dtype=torch.float64)
        for k in range(j + 1, i + 1):
            decay = decay * torch.exp(s.dt[k, d] * s.A[d])  # Abar_k
        naive = (s.C[i] * decay * s.dt[j, d] * s.B[j]).sum()  # C_i (prod Abar_k) Bbar_j
        assert abs(alpha[d, i, j].item() - naive.item()) <= 1e-12 * (1 + abs(naive.item()))


def test_mamba2_alpha_is_the_product_of_head_decays():
    """Mamba-2: alpha[h, i, j] = (C_i . B_j of h's group) prod_{k=j+1..i} exp(Delta_k[h] A[h]) Delta_j[h]."""
    model = random_ssm(3, "mamba2").double()
    adapter = adapter_for(model)
    ids = torch.randint(0, 64, (9,))
    alpha = hidden_attention(model, ids, 1)
    assert alpha.shape == (4, 9, 9) and alpha.dtype == torch.float64
    assert torch.equal(torch.triu(alpha, diagonal=1), torch.zeros_like(alpha))
    s = adapter.ssm_inputs(1, adapter.block_io(ids)[0][1])
    for h, i, j in [(0, 8, 0), (1, 5, 2), (2, 3, 3), (3, 7, 1), (3, 8, 7)]:
        g = h // 2  # 4 heads in 2 groups
        decay = torch.prod(torch.exp(s.dt[j + 1 : i + 1, h] * s.A[h, 0]))
        naive = (s.C[i, g] * s.B[j, g]).sum() * decay * s.dt[j, h]
        assert abs(alpha[h, i, j].item() - naive.item()) <= 1e-12 * (1 + abs(naive.item()))


def test_hidden_attention_takes_a_tokenizer_batch_of_one(tiny_mamba2):
    model, tok = tiny_mamba2
    batch = tok("The capital of France is", return_tensors="pt")["input_ids"]  # (1, T)
    assert batch.dim() == 2
    assert torch.equal(hidden_attention(model, batch, 1), hidden_attention(model, batch[0], 1))
    assert torch.equal(token_flow(model, batch, 1, [3, 40]), token_flow(model, batch[0], 1, [3, 40]))
    with pytest.raises(UserError, match=r"\(T,\) or \(1, T\)"):
        hidden_attention(model, batch.expand(2, -1), 1)


def test_hidden_attention_needs_mamba(tiny_gpt2):
    model, _ = tiny_gpt2
    with pytest.raises(UserError, match="Mamba"):
        hidden_attention(model, torch.tensor([1, 2, 3]), 0)


@pytest.mark.parametrize("mamba2_config", [{}, {"time_step_limit": (0.02, 0.06), "n_groups": 1}])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind", SSM_KINDS)
def test_token_flow_sums_to_the_activation(kind, seed, mamba2_config):
    if mamba2_config and kind != "mamba2":
        pytest.skip("a Mamba-2 configuration")
    model = random_ssm(seed, kind, **mamba2_config)
    neurons = [0, 5, 17, 31]
    for T in (1, 2, 9):
        ids = torch.randint(0, 64, (T,))
        theirs = out_proj_inputs(model, ids)
        for layer in range(2):
            flow = token_flow(model, ids, layer, neurons)
            assert flow.shape == (len(neurons), T)
            err = (flow.sum(1) - theirs[layer][-1, neurons]).abs().max() / theirs[layer][-1].abs().max()
            assert err.item() <= 1e-5
    with pytest.raises(UserError, match="outside"):
        token_flow(model, ids, 0, [32])


def test_flow_shares():
    contrib = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, 2.0, 0.0, 1.0], [0.5, 0.0, 0.0, 1.5]])
    shares = flow_shares(contrib, [1, 2])
    assert shares["signed"]["subject"] == pytest.approx([0.5, 1.0, 0.0])
    assert shares["signed"]["last"] == pytest.approx([0.4, 0.5, 0.75])
    assert shares["signed"]["other"] == pytest.approx([0.1, -0.5, 0.25])
    assert shares["absolute"]["other"] == pytest.approx([0.1, 0.25, 0.25])
    for kind in ("signed", "absolute"):
        totals = [sum(v) for v in zip(*shares[kind].values(), strict=True)]
        assert totals == pytest.approx([1.0] * 3)
    last_in_subject = flow_shares(contrib, [2, 3])  # the last position counts as "last", not "subject"
    assert last_in_subject["signed"]["subject"] == pytest.approx([0.3, 0.0, 0.0])
    assert flow_shares(torch.tensor([[1.0, -1.0]]), [0])["signed"]["subject"] == [None]  # activation 0


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_neox"])
def test_last_position_attention_is_the_models(request, fixture):
    model, tok = request.getfixturevalue(fixture)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    ids = torch.tensor(tok(FACTS[0].prompts[0])["input_ids"])
    ours = adapter_for(model).last_position_attention(ids)
    with torch.no_grad():
        theirs = torch.stack(eager(ids[None], output_attentions=True).attentions)[:, 0, :, -1]  # (layers, heads, T)
    assert ours.shape == (3, 4, len(ids))
    assert torch.allclose(ours.sum(-1), torch.ones(3, 4), atol=1e-6)
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert adapter_for(model).last_position_attention(ids[:1]).flatten().tolist() == pytest.approx([1.0] * 12)


def test_token_mixing_of_a_state_space_model_is_its_normalised_hidden_attention(tiny_mamba2):
    model, tok = tiny_mamba2
    ids = torch.tensor(tok(FACTS[0].prompts[0])["input_ids"])
    mixing = adapter_for(model).token_mixing(ids)  # (layers, T)
    for layer in range(len(mixing)):
        row = hidden_attention(model, ids, layer)[:, -1].abs().mean(0)  # (T,) from the full (units, T, T) map
        assert torch.allclose(mixing[layer], row / row.sum(), atol=1e-6)


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_neox", "tiny_mamba"])
def test_subject_mixing(request, fixture):
    result = subject_mixing(*request.getfixturevalue(fixture), FACTS)
    assert result["n_prompts"] == 3 and set(result["facts"]) == {"capital_france", "river_china"}
    assert result["kind"]
    for table in (result["mean"], *result["facts"].values()):
        totals = [sum(v) for v in zip(*table.values(), strict=True)]
        assert totals == pytest.approx([1.0] * 3, abs=1e-6)
    json.dumps(result, allow_nan=False)


@pytest.fixture(scope="module")
def analysis(tiny_mamba):
    return mamba_attention_analysis(*tiny_mamba, FACTS, REFINED, progress=False)


@pytest.fixture(scope="module", params=SSM_KINDS)
def ssm_analysis(request, analysis):
    """(tiny model, its analysis) of each Mamba-family architecture."""
    if request.param == "mamba":
        return request.getfixturevalue("tiny_mamba"), analysis
    model = request.getfixturevalue(f"tiny_{request.param}")
    return model, mamba_attention_analysis(*model, FACTS, REFINED, progress=False)


def test_mamba_attention_analysis(ssm_analysis):
    (model, tok), analysis = ssm_analysis
    json.dumps(analysis, allow_nan=False)
    adapter = adapter_for(model)
    assert [f["id"] for f in analysis["facts"]] == ["capital_france", "river_china"]
    records = 0
    for fact in analysis["facts"]:
        for p in fact["prompts"]:
            T = len(p["token_ids"])
            assert len(p["tokens"]) == T and len(p["hidden_attention"]) == 3
            for masses in p["hidden_attention"]:
                assert sum(masses.values()) == pytest.approx(1.0)
            acts = adapter.prefix(torch.tensor(p["token_ids"])).acts[0]  # the adapter's own neurons, (layers, width)
            for r in p["neurons"]:
                records += 1
                assert len(r["contributions"]) == T
                assert sum(r["contributions"]) == pytest.approx(r["activation"], rel=1e-4, abs=1e-6)
                assert r["activation"] == pytest.approx(acts[r["layer"], r["index"]].item(), rel=1e-4, abs=1e-6)
                assert sum(r["absolute"].values()) == pytest.approx(1.0)
                assert sum(r["signed"].values()) == pytest.approx(1.0, abs=1e-6)
    assert records == 2 * 3 + 1
    assert analysis["overall"]["n"] == records
    assert analysis["by_relation"]["capital_of"]["n"] == 6 and analysis["by_relation"]["longest_river"]["n"] == 1
    assert [e["flow"]["n"] for e in analysis["by_layer"]] == [4, 1, 2]
    for e in analysis["by_layer"]:
        assert sum(e["flow"]["absolute"].values()) == pytest.approx(1.0)
        assert sum(e["hidden_attention"].values()) == pytest.approx(1.0)
    with pytest.raises(UserError, match="do not exist"):
        mamba_attention_analysis(model, tok, FACTS[:1], {"capital_france": [(3, 0, 1.0)]}, progress=False)


def test_plots(tiny_mamba, tiny_gpt2, analysis, tmp_path):
    model, tok = tiny_mamba
    written = [
        plot_hidden_attention(model, tok, FACTS[0].prompts[0], [0, 2], tmp_path / "hidden.png", subject="France",
                              caveat="a caveat"),
        plot_subject_flow(analysis, tmp_path / "flow.png"),
        plot_subject_flow(analysis, tmp_path / "flow_gpt2.png", gpt2=subject_mixing(*tiny_gpt2, FACTS)),
    ]
    for path in written:
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000


def test_mean_abs_hidden_attention_is_the_channel_mean_of_each_layer(tiny_mamba):
    model, tok = tiny_mamba
    ids = torch.tensor(encode(tok, FACTS[0].prompts[0], FACTS[0].answer)[0])
    maps = mean_abs_hidden_attention(model, ids, [2, 0])
    for k, layer in enumerate([2, 0]):
        torch.testing.assert_close(maps[k], hidden_attention(model, ids, layer).abs().mean(0))


def test_token_labels_show_whitespace(tiny_gpt2):
    tok = tiny_gpt2[1]
    ids = tok("The capital\nof\tFrance", add_special_tokens=False)["input_ids"]
    labels = token_labels(tok, ids)
    assert "".join(labels) == "The␣capital\\nof\\tFrance"
