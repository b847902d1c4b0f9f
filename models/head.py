"""The probability of the answer token under the LM head, with a gradient that needs no softmax backward."""

from __future__ import annotations

import torch
from torch import Tensor


class TargetProbability(torch.autograd.Function):
    """p[r] = softmax(x[r] @ W.T + b)[target[r]]: the probability of one token per row, over the full vocabulary.

    x (rows, d_model) normed last hidden state, W (vocab, d_model) output embedding, b (vocab,) or None.
    No autograd through the softmax: dp/dlogits = p (e_target - P), so dp/dx = p (W[target] - P @ W), and
    P @ W does not depend on the incoming gradient: the forward computes it and keeps only that (rows, d_model)
    product instead of the (rows, vocab) probabilities; when x needs no gradient (causal tracing), it computes
    no P @ W, half the work. Gradients flow to x only (W and b are weights; attribution never asks for theirs).

    On the CPU the vocabulary is walked in blocks of `VOCAB_BLOCK` with an online softmax (a running maximum m
    and sum s per row, rescaled when m grows), so each block's logits are used while they are still in cache:
    logits and probabilities are never written out at full width, which makes the two products about a third
    faster than one (rows, vocab) pass. Elsewhere (a GPU) the whole vocabulary is one block. Rows go `CHUNK` at
    a time on the CPU and `DEVICE_CHUNK` elsewhere (fewer, larger kernels), which bounds the (rows, block) buffer.
    """

    CHUNK = 256  # rows per pass on the CPU
    DEVICE_CHUNK = 2048  # rows per pass elsewhere: a (2048, vocab) buffer, 0.4 GB at GPT-2's vocabulary
    VOCAB_BLOCK = 1024  # vocabulary entries per block on the CPU

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor) -> Tensor:
        block = TargetProbability.VOCAB_BLOCK if x.device.type == "cpu" else len(weight)
        weighted = ctx.needs_input_grad[0]  # P @ W is only for the gradient
        expected, log_sum = torch.empty_like(x), x.new_empty(len(x))  # (rows, d_model) P @ W, (rows,) logsumexp
        chunk = TargetProbability.CHUNK if x.device.type == "cpu" else TargetProbability.DEVICE_CHUNK
        for start in range(0, len(x), chunk):
            rows = slice(start, start + chunk)
            weighted_rows, log_sum[rows] = _softmax_weighted_rows(x[rows], weight, bias, block, weighted)
            if weighted:
                expected[rows] = weighted_rows
        logit = (x * weight[target]).sum(-1) + (bias[target] if bias is not None else 0)  # (rows,)
        p = torch.exp(logit - log_sum)
        ctx.save_for_backward(weight[target] - expected if weighted else None, p)
        return p

    @staticmethod
    def backward(ctx, grad: Tensor):
        direction, p = ctx.saved_tensors  # (rows, d_model) W[target] - P @ W, (rows,)
        return direction * (grad * p)[:, None], None, None, None


def _softmax_weighted_rows(x: Tensor, weight: Tensor, bias: Tensor | None, block: int,
                           weighted: bool = True) -> tuple[Tensor | None, Tensor]:
    """x (n, d_model) -> (softmax(x W.T + b) @ W (n, d_model), None unless `weighted`; logsumexp of the logits
    (n,)), `block` entries of the vocabulary at a time (online softmax: acc and s are kept relative to the running
    maximum m)."""
    acc = x.new_zeros(x.shape)  # sum_v exp(logit_v - m) W[v]
    s = x.new_zeros(len(x), 1)  # sum_v exp(logit_v - m)
    m = x.new_full((len(x), 1), -torch.inf)
    for v in range(0, len(weight), block):
        w = weight[v : v + block]  # (block, d_model)
        logits = x @ w.T if bias is None else torch.addmm(bias[v : v + block], x, w.T)  # (n, block)
        m_new = torch.maximum(m, logits.amax(1, keepdim=True))
        rescale = torch.exp(m - m_new)  # (n, 1); 0 on the first block, where m = -inf
        e = logits.sub_(m_new).exp_()
        s = torch.addcmul(e.sum(1, keepdim=True), s, rescale)
        if weighted:
            acc = torch.addmm(acc * rescale, e, w)
        m = m_new
    return acc / s if weighted else None, (m + s.log())[:, 0]
