"""Knowledge neurons (Dai et al. 2022, arXiv 2104.08696) by integrated gradients, for every layer at once.

For layer l with activation a (width,) at the position that predicts the answer token y, and a baseline b
(zero by default), the integrated-gradients score of neuron i is

    score_l[i] = (a - b)[i] * sum_k w_k dP(y | a <- b + alpha_k (a - b)) / d(scaled a)[i]

with P the softmax probability of y, and (alpha_k, w_k) a quadrature rule of `steps` points on [0, 1]
("riemann_left", Dai et al.'s, is the default). Completeness: sum_i score_l[i] ~ P(y | a) - P(y | b); the
difference is reported as the convergence delta.

Fast path ("the staircase"): scaling the last position of layer l changes nothing before it and nothing below
layer l, so one clean pass gives every layer's prefix state, and each (layer, alpha) pair becomes one row of a
batch that joins after block l and takes single-token steps through the blocks above; one backward pass gives
all gradients. The reference path (a hook that scales the activation in full forward passes, layer by layer)
is kept to check it.

An answer of several tokens is scored by teacher forcing: token k is predicted from prompt + answer[:k],
and the fact-prompt's score is the mean over answer tokens.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from common.errors import UserError
from common.tokens import encode, encode_prompt, teacher_forced
from models import Adapter, Prefix, adapter_for, eval_mode

IG_METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")
Neuron = tuple[int, int, float]  # (layer, neuron index, score)


def quadrature(method: str, steps: int) -> tuple[Tensor, Tensor]:
    """Points alpha (steps,) in [0, 1] and weights w (steps,) that integrate over [0, 1].

    The names are captum's; "riemann_trapezoid" is the exact trapezoidal rule (weights 1/(m-1), halved at the
    ends), so that a linear integrand is integrated exactly.
    """
    if steps < 1 or (method == "riemann_trapezoid" and steps < 2):
        raise UserError(f"--steps {steps} is too small for {method}")
    m = steps
    if method == "riemann_left":
        alphas, weights = np.arange(m) / m, np.full(m, 1 / m)
    elif method == "riemann_right":
        alphas, weights = np.arange(1, m + 1) / m, np.full(m, 1 / m)
    elif method == "riemann_middle":
        alphas, weights = (np.arange(m) + 0.5) / m, np.full(m, 1 / m)
    elif method == "riemann_trapezoid":
        alphas, weights = np.linspace(0, 1, m), np.full(m, 1 / (m - 1))
        weights[[0, -1]] /= 2
    elif method == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(m)
        alphas, weights = (x + 1) / 2, w / 2
    else:
        choices = ", ".join(IG_METHODS)
        raise UserError(f"unknown integrated-gradients method {method!r}; choose from {choices}")
    return torch.from_numpy(alphas), torch.from_numpy(weights)


@dataclass
class Attribution:
    """Integrated gradients of one prompt and answer (means over the answer's tokens).

    scores: (n_layers, width) attribution scores.
    delta:  (n_layers,) completeness delta sum_i score_l[i] - (P(y | a) - P(y | baseline)).
    probs:  (n_answer_tokens,) clean P(answer token k | prompt + answer[:k]).
    """

    scores: Tensor
    delta: Tensor
    probs: Tensor
    prompt_ids: list[int]
    answer_ids: list[int]


def coarse_neurons(scores: Tensor, threshold: float = 0.2) -> list[Neuron]:
    """Neurons with score >= threshold * (the largest score over all layers); none if no score is positive."""
    top = scores.max().item()
    if top <= 0:
        return []
    layers, idx = torch.nonzero(scores >= threshold * top, as_tuple=True)
    return [(int(lay), int(i), float(scores[lay, i])) for lay, i in zip(layers, idx, strict=True)]


def refined_neurons(
    prompt_scores: Sequence[Tensor], threshold: float = 0.2, share: float = 0.5, min_prompts: int = 2
) -> list[Neuron]:
    """Coarse neurons present in >= `share` of a fact's prompts and in >= `min_prompts` of them.

    Each is returned with its score averaged over all the fact's prompts, sorted by layer and index.
    """
    counts = Counter((lay, i) for s in prompt_scores for lay, i, _ in coarse_neurons(s, threshold))
    need = max(min_prompts, share * len(prompt_scores))
    mean = torch.stack(list(prompt_scores)).mean(0)
    return [(lay, i, float(mean[lay, i])) for (lay, i), c in sorted(counts.items()) if c >= need]


class KnowledgeNeurons:
    """Integrated-gradients attribution to the neurons of every layer of a GPT-2 or Mamba causal LM.

    >>> kn = KnowledgeNeurons(model, tokenizer)
    >>> scores = kn.attribute("The capital of France is", " Paris", steps=20)   # (n_layers, width)
    """

    def __init__(self, model, tokenizer):
        self.model = model  # used as handed over: attribution runs it in eval mode and then restores its mode
        self.tokenizer = tokenizer
        self.adapter: Adapter = adapter_for(model)

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers

    @property
    def width(self) -> int:
        return self.adapter.width

    def _ids(self, ids: list[int]) -> Tensor:
        return torch.tensor(ids, device=self.adapter.device)

    def activations(self, prompt: str) -> Tensor:
        """(n_layers, width) neuron activations at the prompt's last position (e.g. for a baseline)."""
        with eval_mode(self.model):
            return self.adapter.prefix(self._ids(encode_prompt(self.tokenizer, prompt)), states=False).acts[0]

    def activations_many(self, prompts: Sequence[str], batch: int = 64, progress: bool = False) -> Tensor:
        """(P, n_layers, width) neuron activations at each prompt's last position, `batch` prompts per forward."""
        ids = [self._ids(encode_prompt(self.tokenizer, p)) for p in prompts]
        starts = tqdm(range(0, len(ids), batch), desc="activations", unit="batch", disable=not progress)
        with eval_mode(self.model):
            return torch.cat([self.adapter.prefixes(ids[i : i + batch], states=False).acts for i in starts])

    def get_coarse_neurons(self, prompt: str, answer: str, threshold: float = 0.2, **kwargs) -> list[Neuron]:
        """Coarse neurons of one prompt: score >= threshold * max score. kwargs go to `attribute`."""
        return coarse_neurons(self.attribute(prompt, answer, **kwargs), threshold)

    def get_refined_neurons(
        self, prompts: Sequence[str], answer: str, threshold: float = 0.2, share: float = 0.5, **kwargs
    ) -> list[Neuron]:
        """Refined neurons of a fact asked by several prompts (see `refined_neurons`). kwargs go to `attribute`."""
        return refined_neurons([self.attribute(p, answer, **kwargs) for p in prompts], threshold, share)

    def attribute(self, prompt: str, answer: str, **options) -> Tensor:
        """(n_layers, width) integrated-gradients scores of P(answer | prompt).

        options (see `attribute_detailed`): steps=20, method="fast" | "reference", ig_method="riemann_left",
        batch_size=None, baseline=None.
        """
        return self.attribute_detailed(prompt, answer, **options).scores

    def attribute_detailed(
        self,
        prompt: str,
        answer: str,
        steps: int = 20,
        method: str = "fast",
        ig_method: str = "riemann_left",
        batch_size: int | None = None,
        baseline: Tensor | None = None,
        name: str = "",
    ) -> Attribution:
        """Scores, completeness deltas and clean probabilities of `answer` after `prompt`.

        method: "fast" (the staircase) or "reference" (hooked full forwards, one layer at a time).
        batch_size: at most this many (layer, alpha) rows per pass (fast) or alphas per pass (reference).
        baseline: (n_layers, width) activations that alpha = 0 stands for; None = zeros (Dai et al.).
        """
        return self.attribute_many([(prompt, answer)], steps, method, ig_method, batch_size, baseline, [name])[0]

    def attribute_many(
        self,
        items: Sequence[tuple[str, str]],
        steps: int = 20,
        method: str = "fast",
        ig_method: str = "riemann_left",
        batch_size: int | None = None,
        baseline: Tensor | None = None,
        names: Sequence[str] | None = None,
    ) -> list[Attribution]:
        """`attribute_detailed` of several (prompt, answer) pairs, their rows in one staircase batch.

        Every answer token of every pair is one teacher-forced instance with its own prefix state; the
        (instance, layer, alpha) rows of all of them go through the blocks together, `batch_size` rows per pass
        at most (None: all at once). names: one per item, for error messages.
        """
        if method not in ("fast", "reference"):
            raise UserError(f"unknown attribution method {method!r}: use 'fast' or 'reference'")
        names = list(names) if names is not None else [""] * len(items)
        encoded = [encode(self.tokenizer, p, a, n) for (p, a), n in zip(items, names, strict=True)]
        instances = [inst for ids in encoded for inst in teacher_forced(*ids)]  # (input ids, target) pairs
        alphas, weights = quadrature(ig_method, steps)
        with eval_mode(self.model):
            if method == "fast":
                results = self._fast(instances, alphas, weights, batch_size, baseline)
            else:
                results = [self._reference(self._ids(ids), target, alphas, weights, batch_size, baseline)
                           for ids, target in instances]
        out, start = [], 0
        for (prompt, _), name, (prompt_ids, answer_ids) in zip(items, names, encoded, strict=True):
            mine = results[start : start + len(answer_ids)]
            start += len(answer_ids)
            scores, delta = (torch.stack([r[k] for r in mine]).mean(0) for k in (0, 1))
            if not (torch.isfinite(scores).all() and torch.isfinite(delta).all()):
                raise UserError(f"{name or repr(prompt)}: attribution scores are not finite (model weights or dtype?)")
            out.append(Attribution(scores, delta, torch.stack([r[2] for r in mine]), prompt_ids, answer_ids))
        return out

    # --- the two ways of computing the path gradients ------------------------------------------------------
    def _path(self, acts: Tensor, alphas: Tensor, baseline: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Row alphas a (R,), baseline b and acts - b (..., n_layers, width) of activations acts (same shape).

        The rows are the quadrature points, then the baseline itself unless the first point already is it
        (riemann_left), so P(y | baseline) comes out of the same batch. Row k of layer l scales to b + a_k (acts - b).
        """
        base = torch.zeros_like(acts) if baseline is None else baseline.to(acts).expand_as(acts)
        a = alphas if alphas[0] == 0 else torch.cat([alphas, alphas.new_zeros(1)])
        return a.to(acts), base, acts - base

    def _combine(self, weighted, probs, diff, steps, p_clean) -> tuple[Tensor, Tensor, Tensor]:
        """Neuron gradients weighted over the quadrature (L, W), row probs (L, rows) -> scores (L, W), delta (L,),
        clean P."""
        scores = diff * weighted
        p_baseline = probs[:, -1] if probs.shape[1] > steps else probs[:, 0]
        delta = scores.sum(-1) - (p_clean - p_baseline)
        return scores.detach().cpu(), delta.detach().cpu(), p_clean.detach().cpu()

    def _fast(self, instances, alphas, weights, batch_size, baseline) -> list[tuple[Tensor, Tensor, Tensor]]:
        """The staircase for P instances (input ids, target) at once -> per instance (scores, delta, clean P).

        Rows r = (layer l, instance p, alpha k), sorted by layer: each joins the batch after block l. The output
        projection is affine, so a row's block output is resid + project(baseline) + alpha (acts - baseline) V,
        with V (width, d_model) the layer's value slots: the rows differ only in alpha along one direction in
        d_model, and they are the leaves. The neurons' gradients (weighted over alphas) are then one product
        with V.T per layer and instance instead of one per row, as is the projection in the forward pass.
        """
        ad = self.adapter
        prefix = ad.prefixes([self._ids(ids) for ids, _ in instances])
        targets = torch.tensor([t for _, t in instances], device=ad.device)
        a, _, diff = self._path(prefix.acts, alphas, baseline)  # (R,), (P, L, W)
        origin, direction = self._entries(prefix, diff)  # (P, L, d_model) each
        P, L, R, D = *origin.shape[:2], len(a), origin.shape[-1]
        grid = torch.arange(L * P * R, device=origin.device)  # rows sorted by layer, then instance, then alpha
        layer_of_row, instance_of_row, alpha_of_row = grid // (P * R), grid // R % P, grid % R
        grads, probs = origin.new_empty(L * P * R, D), origin.new_empty(L * P * R)
        chunk = batch_size or L * P * R
        for start in range(0, L * P * R, chunk):
            rows = slice(start, start + chunk)
            lay, inst = layer_of_row[rows], instance_of_row[rows]
            entry = origin[inst, lay] + a[alpha_of_row[rows], None] * direction[inst, lay]
            leaf = entry.requires_grad_(True)  # (n, d_model) block outputs of the rows' own layers
            try:
                with torch.enable_grad():
                    p = self._staircase(prefix, lay, inst, leaf, targets, clean=start == 0)
                    if start == 0:
                        p_clean, p = p[:P].detach(), p[P:]
                    (g,) = torch.autograd.grad(p.sum(), leaf)
            except torch.OutOfMemoryError as exc:
                raise UserError(f"out of {ad.device.type} memory with {len(leaf)} rows per pass: lower --batch-size "
                                f"(batch_size=) to fewer rows") from exc
            grads[rows], probs[rows] = g, p.detach()
        steps = len(weights)
        weighted = torch.einsum("k,lpkd->lpd", weights.to(grads), grads.view(L, P, R, D)[:, :, :steps])
        neuron_grads = torch.stack([weighted[layer] @ ad.value_slots(layer).detach().T for layer in range(L)], 1)
        probs = probs.view(L, P, R).transpose(0, 1)
        return [self._combine(neuron_grads[i], probs[i], diff[i], steps, p_clean[i]) for i in range(P)]

    def _entries(self, prefix: Prefix, diff: Tensor) -> tuple[Tensor, Tensor]:
        """Where the rows of each (instance, layer) start: the block output at alpha = 0, and its change per unit
        of alpha, (acts - baseline) V. diff = acts - baseline (P, L, W) -> each (P, L, d_model). The projection
        is affine, so the output at alpha = 0 is the clean output less the change: no second pass over V."""
        ad = self.adapter
        with torch.no_grad():
            direction = torch.stack([diff[:, lay] @ ad.value_slots(lay) for lay in range(ad.n_layers)], 1)
        return prefix.outputs - direction, direction

    def _staircase(self, prefix: Prefix, layer_of_row: Tensor, instance_of_row: Tensor, entry: Tensor,
                   targets: Tensor, clean: bool = False) -> Tensor:
        """P(target of the row's instance) for rows whose block `layer_of_row` (n,) outputs entry (n, d_model).

        Rows are sorted by layer; each joins the batch after its layer and steps through the blocks above,
        against its own instance's prefix state (instance_of_row (n,)). clean (rows from layer 0 on): the P
        instances' clean last positions go first along the rows (P more rows in passes of P x alphas or more):
        each block's output for them is checked against the model's forward (`Adapter.check_outputs`) and then
        replaced by the forward's, so each block is checked on its true input, and the first P probabilities
        returned are theirs, the model's P(target | prompt): (P + n,).
        """
        ad = self.adapter
        P = len(prefix.outputs) if clean else 0
        h, index = None, None  # (active rows, d_model) at the last position, (active rows,) their instances
        seen = []  # the clean rows' block outputs, layers 1 ..
        for layer in range(int(layer_of_row[0]), ad.n_layers):
            if h is not None:
                h = ad.step(layer, h, prefix.states[layer], index)
                if P:
                    seen.append(h[:P].detach().clone())  # a copy: a view would keep all of h
                    h = torch.cat([prefix.outputs[:, layer], h[P:]])
            joins = layer_of_row == layer
            if joins.any():
                new_h, new_index = entry[joins], instance_of_row[joins]
                if P and layer == 0:
                    new_h = torch.cat([prefix.outputs[:, 0], new_h])
                    new_index = torch.cat([torch.arange(P, device=new_index.device), new_index])
                h, index = ((new_h, new_index) if h is None
                            else (torch.cat([h, new_h]), torch.cat([index, new_index])))
        if seen:
            ad.check_outputs(torch.stack(seen, 1), prefix.outputs[:, 1:], first_layer=1)
        return ad.answer_probability(h, targets[index])

    def _reference(self, ids, target, alphas, weights, batch_size, baseline):
        ad = self.adapter
        acts = self._clean_activations(ids)
        a, base, diff = self._path(acts, alphas, baseline)
        s = base[:, None, :] + a[:, None] * diff[:, None, :]  # (L, R, W) scaled activations
        L, R, _ = s.shape
        grads, probs = torch.empty_like(s), s.new_empty(L, R)
        chunk = batch_size or R
        for layer in range(L):
            for start in range(0, R, chunk):
                leaf = s[layer, start : start + chunk].detach().requires_grad_(True)
                handle = ad.neuron_module(layer).register_forward_pre_hook(_set_last_position(leaf))
                try:
                    with torch.enable_grad():
                        logits = self.model(ids[None].expand(len(leaf), -1), use_cache=False).logits[:, -1]
                        p = logits.softmax(-1)[:, target]
                        (g,) = torch.autograd.grad(p.sum(), leaf)
                finally:
                    handle.remove()
                grads[layer, start : start + chunk], probs[layer, start : start + chunk] = g, p.detach()
        with torch.no_grad():
            p_clean = self.model(ids[None], use_cache=False).logits[0, -1].softmax(-1)[target]
        weighted = torch.einsum("k,lkw->lw", weights.to(grads), grads[:, : len(weights)])
        return self._combine(weighted, probs, diff, len(weights), p_clean)

    def _clean_activations(self, ids: Tensor) -> Tensor:
        """(n_layers, width) neuron activations at the last position, read by hooks from a full forward."""
        acts: list[Tensor] = []
        handles = [
            self.adapter.neuron_module(layer).register_forward_pre_hook(
                lambda module, args: acts.append(args[0][0, -1].detach())
            )
            for layer in range(self.n_layers)
        ]
        try:
            with torch.no_grad():
                self.model(ids[None], use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        return torch.stack(acts)



def _set_last_position(values: Tensor):
    """A forward pre-hook that replaces the module input's last position by `values` (batch, width)."""

    def hook(module, args):
        x = args[0]
        return (torch.cat([x[:, :-1], values[:, None].to(x.dtype)], dim=1), *args[1:])

    return hook
