"""Causal self-attention of new positions over a cached prefix (the last position, or several): shared by the
transformer adapters."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from models.base import Adapter


@dataclass
class KV:
    """Keys and values of the positions of a prefix, for P prompts padded to the longest (the attribution: the
    positions before each prompt's last; causal tracing: those before a restored position).

    k, v: (P, heads, T_max, head_dim); valid: (P, T_max), False where a shorter prompt is padded;
    position: (P,) the index of the first position after the prefix (T_p - 1: the last; for rotary embeddings).
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


def prefix_weights(q: Tensor, k_self: Tensor, state: KV, index: Tensor, scale: float,
                   blocked: Tensor | None = None) -> Tensor:
    """Softmax weights of n consecutive new positions of each row over [its prompt's prefix..., the new positions
    up to itself] (causal): (rows, heads, n, T_max + n).

    q, k_self: (rows, n, heads, head_dim); index: (rows,) the prompt of each row; padded prefix positions weigh 0.
    Each row's scores are against its own prompt's keys only (see `_with_own_prompt`). blocked: (rows, T_max + n)
    bool, edges the new positions may not read (attention knockout, Geva et al. 2023: their scores are -inf).
    """
    n = q.shape[1]
    scores_prefix = _with_own_prompt("nhd,htd->hnt", q, state.k, index)  # (rows, heads, n, T_max)
    scores_prefix = scores_prefix.masked_fill(~state.valid[index][:, None, None, :], -torch.inf)
    scores_self = torch.einsum("rnhd,rmhd->rhnm", q, k_self)  # (rows, heads, n, n)
    if n > 1:
        later = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        scores_self = scores_self.masked_fill(later, -torch.inf)
    scores = torch.cat([scores_prefix, scores_self], dim=-1) * scale
    if blocked is not None:
        scores = scores.masked_fill(blocked[:, None, None, :], -torch.inf)
    return scores.softmax(dim=-1)


def attend(weights: Tensor, v_self: Tensor, state: KV, index: Tensor) -> Tensor:
    """(rows, heads, n, T_max + n) weights, (rows, n, heads, head_dim) own values -> (rows, n, heads, head_dim)."""
    longest = state.v.shape[2]
    prefix = _with_own_prompt("hnt,htd->nhd", weights[..., :longest].contiguous(), state.v, index)
    return prefix + torch.einsum("rhnm,rmhd->rnhd", weights[..., longest:], v_self)


class TransformerAdapter(Adapter):
    """What the transformer adapters share: a KV prefix state, and their attention weights as token mixing.

    Subclasses give `_qkv(layer, x, positions)` -> q, k, v (n, heads, head_dim) of block inputs x (n, d_model) at
    `positions` (n,), `_scaling(layer)`, the factor of q . k before the softmax, and `pre_neurons` written with
    `_attend` so that it takes the inputs of one position after the prefix, h (rows, d_model), or of n
    consecutive ones, h (rows, n, d_model) (causal tracing's `run_block`).
    """

    token_mixing_kind = "attention weights of the last position, heads averaged"
    mixing_site = "attention output (after its output projection, before the residual sum)"

    def _qkv(self, layer: int, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def _scaling(self, layer: int) -> float:
        raise NotImplementedError

    def _keys_values(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of all T positions of x (P, T, d_model), one batched projection: (P, heads, T, head_dim)."""
        P, T = x.shape[:2]
        _, k, v = self._qkv(layer, x.flatten(0, 1), torch.arange(T, device=x.device).repeat(P))
        return tuple(t.unflatten(0, (P, T)).transpose(1, 2) for t in (k, v))

    def layer_states(self, layer: int, x: Tensor, before: Tensor) -> KV:
        """Keys and values of every prompt's positions before its last, from one batched projection of the
        padded block inputs x (P, T, d_model); T_max = before.max() key positions, the rest not valid."""
        longest = int(before.max())
        k, v = self._keys_values(layer, x[:, :longest])
        return KV(k, v, torch.arange(longest, device=x.device) < before[:, None], before)

    def position_states(self, layer: int, x: Tensor) -> list[KV]:
        """The keys and values of positions < t of P whole sequences x (P, T, d_model), for t = 0 .. T - 1: views
        of one projection of all positions."""
        (P, T), device = x.shape[:2], x.device
        k, v = self._keys_values(layer, x)
        return [KV(k[:, :, :t], v[:, :, :t], torch.ones(P, t, dtype=torch.bool, device=device),
                   torch.full((P,), t, device=device)) for t in range(T)]

    def extend(self, layer: int, state: KV, index: Tensor, h: Tensor) -> KV:
        """Each row's prompt's keys and values followed by those of its n positions h (rows, n, d_model)."""
        rows, n = h.shape[:2]
        positions = state.position[index][:, None] + torch.arange(n, device=h.device)  # (rows, n)
        _, k, v = self._qkv(layer, h.flatten(0, 1), positions.flatten())
        k, v = (t.unflatten(0, (rows, n)).transpose(1, 2) for t in (k, v))  # (rows, heads, n, head_dim)
        valid = torch.cat([state.valid[index], torch.ones(rows, n, dtype=torch.bool, device=h.device)], 1)
        return KV(torch.cat([state.k[index], k], 2), torch.cat([state.v[index], v], 2), valid, positions[:, -1] + 1)

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
                rows.append(prefix_weights(q[:, None], k[:, None], state, index, self._scaling(layer))[0, :, 0])
        return torch.stack(rows)

    def knockout_output(self, layer: int, x: Tensor, blocked: Tensor) -> Tensor:
        state = self.layer_states(layer, x[None], torch.tensor([len(x) - 1], device=x.device))
        index = torch.zeros(1, dtype=torch.long, device=x.device)
        resid, acts = self.pre_neurons(layer, x[-1:], state, index, blocked=blocked[None])
        return (resid + self.project(layer, acts))[0]

    def run_block(self, layer: int, h: Tensor, state: KV, index: Tensor) -> Tensor:
        """`step` of n positions at once: `pre_neurons` takes h (rows, n, d_model) as well."""
        return self.step(layer, h, state, index)

    def _attend(self, layer: int, h: Tensor, state: KV, index: Tensor, blocked: Tensor | None = None) -> Tensor:
        """Block inputs of the position after each row's prefix, (rows, d_model), or of the n positions from there,
        (rows, n, d_model) -> attention output (rows, heads * head_dim) or (rows, n, heads * head_dim);
        blocked: (rows, T_max + n) edges masked out (see `prefix_weights`)."""
        x = h if h.dim() == 3 else h[:, None]
        rows, n = x.shape[:2]
        positions = state.position[index][:, None] + torch.arange(n, device=h.device)  # (rows, n)
        q, k, v = (t.unflatten(0, (rows, n)) for t in self._qkv(layer, x.flatten(0, 1), positions.flatten()))
        w = prefix_weights(q, k, state, index, self._scaling(layer), blocked)  # (rows, heads, n, T_max + n)
        out = attend(w, v, state, index).flatten(-2)  # (rows, n, heads * head_dim)
        return out if h.dim() == 3 else out[:, 0]
