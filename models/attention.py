"""Causal self-attention of the last position over a cached prefix: shared by the transformer adapters."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from models.base import Adapter


@dataclass
class KV:
    """Keys and values of the positions before the last, for P prompts padded to the longest.

    k, v: (P, heads, T_max, head_dim); valid: (P, T_max), False where a shorter prompt is padded;
    position: (P,) the last position's index T_p - 1 (for rotary embeddings).
    """

    k: Tensor
    v: Tensor
    valid: Tensor
    position: Tensor


def _grouped(index: Tensor, n_prompts: int) -> tuple[Tensor, Tensor] | None:
    """When every prompt has the same number of rows (the staircase's passes without a row limit): the order that
    groups the rows by prompt and its inverse, each (rows,); else None."""
    counts = torch.bincount(index, minlength=n_prompts)
    if len(index) == 0 or bool((counts != counts[0]).any()):
        return None
    order = torch.argsort(index, stable=True)
    return order, torch.argsort(order)


def _with_own_prompt(equation: str, rows: Tensor, state_tensor: Tensor, index: Tensor) -> Tensor:
    """A product of per-row tensors `rows` (rows, heads, ...) with their own prompt's `state_tensor`
    (P, heads, T_max, ...), `equation` written for one row ("hd,htd->ht"): a batched product per prompt when
    every prompt has as many rows (no copy of the state, no work against other prompts' states), else with each
    row's state gathered."""
    operands, out = equation.split("->")
    a, b = operands.split(",")
    grouped = _grouped(index, len(state_tensor))
    if grouped is None:
        return torch.einsum(f"r{a},r{b}->r{out}", rows, state_tensor[index])
    order, inverse = grouped
    per_prompt = rows[order].unflatten(0, (len(state_tensor), -1))  # (P, m, heads, ...)
    return torch.einsum(f"pm{a},p{b}->pm{out}", per_prompt, state_tensor).flatten(0, 1)[inverse]


def last_position_weights(q: Tensor, k_self: Tensor, state: KV, index: Tensor, scale: float,
                          blocked: Tensor | None = None) -> Tensor:
    """Softmax weights of the last position over [its prompt's prefix..., itself]: (rows, heads, T_max + 1).

    q, k_self: (rows, heads, head_dim); index: (rows,) the prompt of each row; padded positions weigh 0. Each
    row's scores are against its own prompt's keys only (see `_with_own_prompt`). blocked: (rows, T_max + 1)
    bool, edges the last position may not read (attention knockout, Geva et al. 2023: their scores are -inf).
    """
    scores_prefix = _with_own_prompt("hd,htd->ht", q, state.k, index)  # (rows, heads, T_max)
    scores_prefix = scores_prefix.masked_fill(~state.valid[index][:, None, :], -torch.inf)
    scores_self = (q * k_self).sum(-1, keepdim=True)  # (rows, heads, 1)
    scores = torch.cat([scores_prefix, scores_self], dim=-1) * scale
    if blocked is not None:
        scores = scores.masked_fill(blocked[:, None, :], -torch.inf)
    return scores.softmax(dim=-1)


def attend(weights: Tensor, v_self: Tensor, state: KV, index: Tensor) -> Tensor:
    """(rows, heads, T_max + 1) weights, (rows, heads, head_dim) own value -> (rows, heads, head_dim) output."""
    prefix = _with_own_prompt("ht,htd->hd", weights[..., :-1].contiguous(), state.v, index)
    return prefix + weights[..., -1:] * v_self


class TransformerAdapter(Adapter):
    """What the transformer adapters share: a KV prefix state, and their attention weights as token mixing.

    Subclasses give `_qkv(layer, x, positions)` -> q, k, v (n, heads, head_dim) of block inputs x (n, d_model) at
    `positions` (n,), and `_scaling(layer)`, the factor of q . k before the softmax.
    """

    token_mixing_kind = "attention weights of the last position, heads averaged"
    mixing_site = "attention output (after its output projection, before the residual sum)"

    def _qkv(self, layer: int, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def _scaling(self, layer: int) -> float:
        raise NotImplementedError

    def layer_states(self, layer: int, x: Tensor, before: Tensor) -> KV:
        """Keys and values of every prompt's positions before its last, from one batched projection of the
        padded block inputs x (P, T, d_model); T_max = before.max() key positions, the rest not valid."""
        P, longest = len(x), int(before.max())
        positions = torch.arange(longest, device=x.device)
        _, k, v = self._qkv(layer, x[:, :longest].flatten(0, 1), positions.repeat(P))
        k, v = (t.unflatten(0, (P, longest)).transpose(1, 2) for t in (k, v))  # (P, heads, T_max, head_dim)
        return KV(k, v, positions < before[:, None], before)

    def token_mixing(self, input_ids: Tensor) -> Tensor:
        return self.last_position_attention(input_ids).mean(1)

    def last_position_attention(self, input_ids: Tensor) -> Tensor:
        """input_ids (T,) -> (n_layers, heads, T): every layer's attention weights of the last position."""
        inputs, _, _ = self.block_io(input_ids)
        rows = []
        index = torch.zeros(1, dtype=torch.long, device=self.device)
        with torch.no_grad():
            for layer, x in enumerate(inputs):  # x: (T, d_model) block input
                state = self.layer_states(layer, x[None], torch.tensor([len(x) - 1], device=x.device))
                q, k, _ = self._qkv(layer, x[-1:], state.position)  # (1, heads, head_dim) each
                rows.append(last_position_weights(q, k, state, index, self._scaling(layer))[0])
        return torch.stack(rows)

    def knockout_output(self, layer: int, x: Tensor, blocked: Tensor) -> Tensor:
        state = self.layer_states(layer, x[None], torch.tensor([len(x) - 1], device=x.device))
        index = torch.zeros(1, dtype=torch.long, device=x.device)
        resid, acts = self.pre_neurons(layer, x[-1:], state, index, blocked=blocked[None])
        return (resid + self.project(layer, acts))[0]

    def run_block(self, layer: int, h: Tensor) -> Tensor:
        """As `Adapter.run_block`, with the causal mask (additive, (1, 1, T, T)) and `_block_kwargs`."""
        T = h.shape[1]
        above = torch.ones(T, T, dtype=torch.bool, device=h.device).triu(1)
        mask = torch.zeros(T, T, dtype=h.dtype, device=h.device).masked_fill(above, torch.finfo(h.dtype).min)
        out = self.layers[layer](h, attention_mask=mask[None, None], **self._block_kwargs(h))
        return out[0] if isinstance(out, tuple) else out

    def _block_kwargs(self, h: Tensor) -> dict:
        """What else a block call needs for inputs h (rows, T, d_model) (rotary embeddings)."""
        return {}

    def _attend(self, layer: int, h: Tensor, state: KV, index: Tensor, blocked: Tensor | None = None) -> Tensor:
        """(rows, d_model) block inputs at the last position -> (rows, heads * head_dim) attention output;
        blocked: (rows, T_max + 1) edges masked out (see `last_position_weights`)."""
        q, k, v = self._qkv(layer, h, state.position[index])
        w = last_position_weights(q, k, state, index, self._scaling(layer), blocked)  # (rows, heads, T_max + 1)
        return attend(w, v, state, index).reshape(len(h), -1)
