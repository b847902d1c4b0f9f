"""The Mamba-2 and Falcon-Mamba adapters rebuild the model's own blocks (the attribution tests check the scores)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_mamba2_config
from transformers import Mamba2ForCausalLM

from common.errors import UserError
from knowledge_neurons import KnowledgeNeurons
from models import MambaAdapter, adapter_for
from models.mamba import _blocks, _DecayedReadout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mamba2_time_step_limit_is_applied(dtype):
    """A limit that clamps Delta on both sides: the adapter's blocks agree with the model's chunked scan."""
    torch.manual_seed(1)
    model = Mamba2ForCausalLM(tiny_mamba2_config(time_step_limit=(0.02, 0.06))).eval().requires_grad_(False)
    adapter = adapter_for(model.to(dtype))
    for T in (1, 2, 4, 5, 11):  # within one chunk of 4, at its edge, across several
        prefix = adapter.prefix(torch.randint(0, 300, (T,)))
        adapter.verify(prefix)  # raises if a layer differs from the forward
        assert prefix.acts.dtype == dtype and prefix.acts.shape == (1, 3, 64)
    x = adapter.block_io(torch.randint(0, 300, (20,)))[0][1]
    dt = adapter.ssm_inputs(1, x).dt  # (T, heads)
    assert dt.shape == (20, 8)
    assert (dt == 0.02).any() and (dt == 0.06).any() and ((dt > 0.02) & (dt < 0.06)).any()


def test_mamba2_neuron_factor_is_the_gated_norm(tiny_mamba2):
    """neurons = y * factor(y, z) is the mixer's own gated RMSNorm, whose rms runs over each of n_groups groups."""
    model, _ = tiny_mamba2
    adapter = adapter_for(model)
    norm = model.backbone.layers[2].mixer.norm
    assert norm.group_size == 32  # 2 groups of 32 channels
    y, z = torch.randn(5, 64), torch.randn(5, 64)
    y[:, 32:] *= 10.0  # groups of very different scale: one rms over all channels would be wrong
    assert torch.allclose(y * adapter.neuron_factor(2, y, z), norm(y, z), rtol=1e-5, atol=1e-6)


def test_falcon_mamba_needs_its_normalised_b_c_delta(tiny_falcon_mamba):
    """The Mamba adapter without the RMS norms of B, C and Delta fails the check against the model's forward on
    Falcon-Mamba, alone (`verify`) and inside the attribution's staircase."""
    model, tokenizer = tiny_falcon_mamba
    ids = torch.randint(0, 300, (6,))
    adapter = adapter_for(model)
    adapter.verify(adapter.prefix(ids))
    wrong = MambaAdapter(model)
    with pytest.raises(RuntimeError, match=r"layer 1 recomputed .* not supported by the adapter"):
        wrong.verify(wrong.prefix(ids))
    kn = KnowledgeNeurons(model, tokenizer)
    kn.attribute("The capital of France is", "Paris", steps=2)
    kn.adapter = wrong
    with pytest.raises(RuntimeError, match=r"layer 1 recomputed .* not supported by the adapter"):
        kn.attribute("The capital of France is", "Paris", steps=2, batch_size=3)


@pytest.mark.parametrize("blocks", ["runs of one prompt", "gathered states"])
def test_mamba_decayed_readout_equals_autograd(monkeypatch, blocks):
    """Mamba's blocked readout sum_n C exp(Delta A) h, both block forms (as on the CPU: runs of one prompt with its
    state broadcast, and short runs put together with their states gathered; as on a GPU: any rows with their
    states gathered), against plain autograd; several prompts, runs longer than a block, a short last block."""
    if blocks == "gathered states":
        monkeypatch.setattr(_DecayedReadout, "ELEMENTS", {})
        monkeypatch.setattr(_DecayedReadout, "GATHER_ELEMENTS", 3 * 6 * 4)  # 3 rows of (d_state, d_inner) a block
    else:
        monkeypatch.setattr(_DecayedReadout, "ELEMENTS", {"cpu": 3 * 6 * 4})
        kinds = [type(p) for _, p in _blocks(torch.tensor([0, 0, 0, 0, 2, 2, 1, 1, 1, 1, 1]), 6 * 4, "cpu")]
        assert kinds == [int, int, torch.Tensor, int, int]  # 0 0 0 | 0 | 2 2 (gathered) | 1 1 1 | 1 1
    gen = torch.Generator().manual_seed(0)
    rows, d_inner, d_state = 11, 6, 4

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    dt = torch.rand(rows, d_inner, generator=gen, dtype=torch.float64).requires_grad_(True)
    C = rand(rows, d_state).requires_grad_(True)
    A = -4 * torch.rand(d_inner, d_state, generator=gen, dtype=torch.float64)
    h, upstream = rand(3, d_inner, d_state), rand(rows, d_inner)
    index = torch.tensor([0, 0, 0, 0, 2, 2, 1, 1, 1, 1, 1])

    y = _DecayedReadout.apply(dt, C, A, h, index)
    grads = torch.autograd.grad((y * upstream).sum(), (dt, C))
    y_ref = torch.einsum("rn,rdn->rd", C, torch.exp(dt[:, :, None] * A) * h[index])
    grads_ref = torch.autograd.grad((y_ref * upstream).sum(), (dt, C))

    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-14)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-14)


def test_mamba2_and_falcon_mamba_ask_for_transformers_5(monkeypatch, tiny_mamba2, tiny_falcon_mamba):
    """Under transformers 4.x their adapters would fail on a missing module attribute; instead a clear error."""
    import models.registry

    monkeypatch.setattr(models.registry, "version", lambda package: "4.57.6")
    for model, _ in (tiny_mamba2, tiny_falcon_mamba):
        with pytest.raises(UserError, match="need transformers 5"):
            adapter_for(model)
