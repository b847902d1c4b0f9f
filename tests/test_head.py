"""The answer probability's custom autograd function against autograd through a plain softmax."""

import pytest
import torch

from models.head import TargetProbability


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("block", [7, 1024])  # 7: many blocks and a short last one; 1024: the whole vocabulary
def test_probability_and_gradient_equal_a_plain_softmax(monkeypatch, with_bias, block):
    monkeypatch.setattr(TargetProbability, "VOCAB_BLOCK", block)
    monkeypatch.setattr(TargetProbability, "CHUNK", 3)  # rows in several passes
    gen = torch.Generator().manual_seed(0)
    rows, d_model, vocab = 8, 5, 61
    x = (3 * torch.randn(rows, d_model, generator=gen, dtype=torch.float64)).requires_grad_(True)
    weight = torch.randn(vocab, d_model, generator=gen, dtype=torch.float64)
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64) if with_bias else None
    target = torch.randint(vocab, (rows,), generator=gen)
    upstream = torch.randn(rows, generator=gen, dtype=torch.float64)

    p = TargetProbability.apply(x, weight, bias, target)
    (grad,) = torch.autograd.grad((p * upstream).sum(), x)
    logits = x @ weight.T + (bias if with_bias else 0)
    p_ref = logits.softmax(-1).gather(1, target[:, None])[:, 0]
    (grad_ref,) = torch.autograd.grad((p_ref * upstream).sum(), x)

    torch.testing.assert_close(p, p_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-12)
