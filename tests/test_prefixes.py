"""Prefix states of a padded batch of prompts (one vectorised computation per layer) against the former
implementation kept here as the reference: prompt by prompt, and for the state-space models a Python loop over
the prompt's tokens (h_t = exp(Delta_t A) h_{t-1} + Delta_t B_t x_t)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from models import adapter_for
from models.attention import KV, TransformerAdapter
from models.mamba import ConvSSMState, MambaAdapter
from models.mamba2 import Mamba2Adapter, Mamba2State

LENGTHS = (1, 7, 2, 12, 1, 5, 4)  # mixed lengths, one-token prompts, the longest not first


def _window(xs, k):
    """(T, channels) conv inputs of the positions before the last -> (channels, k - 1) the conv's window."""
    return torch.cat([xs.new_zeros(max(0, k - 1 - len(xs)), xs.shape[1]), xs[len(xs) - (k - 1) :]]).T


def _mamba_reference(adapter: MambaAdapter, layer: int, x) -> ConvSSMState:
    """x: (T-1, d_model) one prompt's block inputs before its last position -> its state (P = 1)."""
    mixer = adapter.layers[layer].mixer
    k = mixer.conv_kernel_size
    taps, bias = mixer.conv1d.weight[:, 0, :-1], mixer.conv1d.bias
    if not len(x):
        return ConvSSMState(bias[None].clone(), x.new_zeros(1, *mixer.A_log.shape), x.new_zeros(1, k - 1, len(bias)))
    s = adapter.ssm_inputs(layer, x)
    ssm = s.xs.new_zeros(s.A.shape)
    for t in range(len(x)):
        ssm = torch.exp(s.dt[t, :, None] * s.A) * ssm + s.dt[t, :, None] * s.B[t] * s.u[t, :, None]
    window = _window(s.xs, k)
    return ConvSSMState(((window * taps).sum(-1) + bias)[None], ssm[None], window.T[None])


def _mamba2_reference(adapter: Mamba2Adapter, layer: int, x) -> Mamba2State:
    mixer = adapter.layers[layer].mixer
    k, heads, p, n = mixer.conv_kernel_size, mixer.num_heads, mixer.head_dim, mixer.ssm_state_size
    taps, bias = mixer.conv1d.weight[:, 0, :-1], mixer.conv1d.bias
    ssm = x.new_zeros(heads, p, n)
    if not len(x):
        return Mamba2State(bias[None].clone(), ssm[None], x.new_zeros(1, k - 1, len(bias)))
    s = adapter.ssm_inputs(layer, x)
    u, B, dt = s.u.unflatten(-1, (heads, p)), adapter._heads(mixer, s.B), s.dt[..., None, None]
    for t in range(len(x)):
        ssm = torch.exp(dt[t] * s.A[:, None]) * ssm + dt[t] * u[t, :, :, None] * B[t, :, None, :]
    window = _window(s.xs, k)
    return Mamba2State(((window * taps).sum(-1) + bias)[None], ssm[None], window.T[None])


def _kv_reference(adapter: TransformerAdapter, layer: int, x) -> KV:
    _, k, v = adapter._qkv(layer, x, torch.arange(len(x)))
    return KV(k.transpose(0, 1)[None], v.transpose(0, 1)[None], torch.ones(1, len(x), dtype=torch.bool),
              torch.tensor([len(x)]))


def _stack(states):
    """Reference states of single prompts -> one state of them all (KVs padded with zeros to the longest)."""
    if not isinstance(states[0], KV):
        return type(states[0])(*(torch.cat([getattr(s, f) for s in states]) for f in ("conv", "ssm", "window")))
    longest = max(s.k.shape[2] for s in states)
    pad = [longest - s.k.shape[2] for s in states]
    k, v = (torch.cat([F.pad(getattr(s, f), (0, 0, 0, m)) for s, m in zip(states, pad, strict=True)])
            for f in ("k", "v"))
    valid = torch.cat([F.pad(s.valid, (0, m), value=False) for s, m in zip(states, pad, strict=True)])
    return KV(k, v, valid, torch.cat([s.position for s in states]))


def _reference(adapter, layer, x):
    if isinstance(adapter, TransformerAdapter):
        return _kv_reference(adapter, layer, x)
    return (_mamba2_reference if isinstance(adapter, Mamba2Adapter) else _mamba_reference)(adapter, layer, x)


def test_batched_prefix_states_equal_the_per_prompt_per_token_reference(tiny_model):
    """Every architecture, mixed lengths with one-token prompts: the states (valid key positions) equal the
    reference to 1e-6 in float32, and the activations and block outputs they give are the model's own forward's."""
    model, _ = tiny_model
    adapter = adapter_for(model)
    torch.manual_seed(3)
    prompts = [torch.randint(1, 300, (n,)) for n in LENGTHS]
    prefix = adapter.prefixes(prompts)
    adapter.verify(prefix)  # the adapter's blocks on these states give the model's own outputs
    inputs, _ = adapter._batched_block_io(prompts)
    index, last = torch.arange(len(prompts)), torch.tensor(LENGTHS) - 1
    with torch.no_grad():
        for layer, x in enumerate(inputs):
            ours = prefix.states[layer]
            theirs = _stack([_reference(adapter, layer, x[p, :n]) for p, n in enumerate(last.tolist())])
            if isinstance(ours, KV):
                assert torch.equal(ours.valid, theirs.valid) and torch.equal(ours.position, theirs.position)
                mask = ours.valid[:, None, :, None]
                for f in ("k", "v"):
                    assert torch.allclose(getattr(ours, f) * mask, getattr(theirs, f), rtol=0, atol=1e-6)
            else:
                for f in ("conv", "ssm", "window"):
                    assert getattr(ours, f).shape == getattr(theirs, f).shape
                    # rtol: the window holds the conv inputs themselves (up to ~10 in the tiny Falcon-Mamba)
                    assert torch.allclose(getattr(ours, f), getattr(theirs, f), rtol=1e-6, atol=1e-6), f
            resid, acts = adapter.pre_neurons(layer, x[index, last], theirs, index)
            # the forward's neurons and outputs, which sum in another order: to 1e-6 of their largest (float32)
            output = resid + adapter.project(layer, acts)
            for forward, recomputed in ((prefix.outputs[:, layer], output), (prefix.acts[:, layer], acts)):
                tol = 1e-6 * (1.0 + recomputed.abs().max().item())
                torch.testing.assert_close(forward, recomputed, rtol=0, atol=tol)


@pytest.mark.parametrize("n", [1, 9])
def test_one_prompt_batch_equals_a_batch_of_many(tiny_model, n):
    """A prompt's prefix does not depend on the prompts padded with it (to the model forward's own float32
    rounding, which differs between batch shapes)."""
    model, _ = tiny_model
    adapter = adapter_for(model)
    torch.manual_seed(4)
    prompt = torch.randint(1, 300, (n,))
    alone = adapter.prefix(prompt)
    together = adapter.prefixes([torch.randint(1, 300, (13,)), prompt, torch.randint(1, 300, (3,))])
    assert torch.allclose(alone.acts[0], together.acts[1], rtol=1e-5, atol=1e-5)
    assert torch.allclose(alone.outputs[0], together.outputs[1], rtol=1e-5, atol=1e-5)


def test_padded_forward_gives_the_model_its_mask(tiny_model, caplog, monkeypatch):
    """A model with a pad token that sees one in a batch without an attention mask makes transformers warn of
    "incorrect output" (once a process); the padded forward passes its mask, so no run shows that warning."""
    from transformers.utils.logging import warning_once

    model, _ = tiny_model
    monkeypatch.setattr(model.config, "pad_token_id", 0)  # the pads' token
    warning_once.cache_clear()  # the warning comes once a process: here, whatever ran before
    adapter_for(model).prefixes([torch.randint(1, 300, (n,)) for n in LENGTHS])
    assert "attention_mask" not in caplog.text


@pytest.mark.parametrize("index", [[0, 1, 2, 0, 1, 2], [2, 2, 0, 1, 0, 1], [0, 0, 0, 1, 2, 2]])
def test_attention_against_own_prompt_grouped_and_gathered(index):
    """Rows against their own prompt's keys and values: as a product per prompt (every prompt has as many rows,
    in any order) and with states gathered (uneven rows), both equal to one row at a time."""
    from models.attention import _with_own_prompt

    gen = torch.Generator().manual_seed(0)
    index = torch.tensor(index)
    q, w = torch.randn(6, 2, 5, generator=gen), torch.randn(6, 2, 4, generator=gen)
    k, v = torch.randn(3, 2, 4, 5, generator=gen), torch.randn(3, 2, 4, 5, generator=gen)
    scores, out = _with_own_prompt("hd,htd->ht", q, k, index), _with_own_prompt("ht,htd->hd", w, v, index)
    for r, p in enumerate(index.tolist()):
        torch.testing.assert_close(scores[r], torch.einsum("hd,htd->ht", q[r], k[p]))
        torch.testing.assert_close(out[r], torch.einsum("ht,htd->hd", w[r], v[p]))


def test_blocks_continue_the_state_before_every_position(tiny_model):
    """Causal tracing's prefix states: a block run on positions t.. of some sequences from `position_states`' t-th
    state (t = 0: nothing before; t = T - 1: the last position alone), and the last position's step from that
    state extended by positions t .. T - 2, equal the model's own block outputs there, every layer, rows
    continuing other sequences' states in another order; float64, 9 positions (past the conv window, over several
    of the tiny Mamba-2's SSD chunks)."""
    model, _ = tiny_model
    adapter = adapter_for(copy.deepcopy(model).double())  # a copy: the fixture is shared
    torch.manual_seed(5)
    inputs, last_out = adapter._batched_block_io([torch.randint(1, 300, (9,)) for _ in range(3)])
    index = torch.tensor([2, 0, 1, 1])
    with torch.no_grad():
        for layer, x in enumerate(inputs):  # x: (3, 9, d_model)
            expected = inputs[layer + 1] if layer + 1 < adapter.n_layers else last_out
            # 1e-6 of the largest output: Mamba-2's gated norm computes in float32 inside the real model, even in a
            # float64 model (a wrong prefix state is off by the outputs' own size)
            tol = dict(rtol=1e-6, atol=1e-6 * expected.abs().max().item())
            states = adapter.position_states(layer, x)
            assert len(states) == x.shape[1]
            for t, state in enumerate(states):
                torch.testing.assert_close(adapter.run_block(layer, x[index, t:], state, index), expected[index, t:],
                                           **tol)
                if t < x.shape[1] - 1:  # the state extended by positions t .. T - 2, and the last position's step
                    longer = adapter.extend(layer, state, index, x[index, t:-1])
                    last = adapter.step(layer, x[index, -1], longer, torch.arange(len(index)))
                    torch.testing.assert_close(last, expected[index, -1], **tol)


def test_scan_outputs_in_prompt_chunks_equal_one_batch(tiny_model, monkeypatch):
    """`SSMInputs.outputs` splits the prompts into chunks whose states fit STATE_ELEMENTS: one prompt a chunk gives
    the one-batch outputs, with and without a starting state (float64)."""
    import models.ssm as ssm

    model, _ = tiny_model
    adapter = adapter_for(copy.deepcopy(model).double())
    if not isinstance(adapter, ssm.SSMAdapter):
        pytest.skip("a state-space model's scan")
    torch.manual_seed(6)
    inputs, _ = adapter._batched_block_io([torch.randint(1, 300, (6,)) for _ in range(4)])
    with torch.no_grad():
        s = adapter.ssm_inputs(0, inputs[0])  # fields (4, 6, ...)
        H, channels = s.dt.shape[-1], s.u.shape[-1] // s.dt.shape[-1]
        initial = torch.randn(4, H, channels, s.B.shape[-1], dtype=torch.float64)
        whole = [s.outputs(), s.outputs(initial)]
        monkeypatch.setattr(ssm, "STATE_ELEMENTS", 1)
        chunked = [s.outputs(), s.outputs(initial)]
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
