"""Causal self-attention of the last position over a cached prefix: shared by the transformer adapters."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
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


def last_position_weights(q: Tensor, k_self: Tensor, state: KV, index: Tensor, scale: float) -> Tensor:
    """Softmax weights of the last position over [its prompt's prefix..., itself]: (rows, heads, T_max + 1).

    q, k_self: (rows, heads, head_dim); index: (rows,) the prompt of each row; padded positions weigh 0. The
    scores against every prompt's keys are computed and the row's own picked (P x the attention's small cost),
    so no (rows, heads, T_max, head_dim) copy of the keys is made.
    """
    rows = torch.arange(len(q), device=q.device)
    scores_prefix = torch.einsum("rhd,phtd->rpht", q, state.k)[rows, index]  # (rows, heads, T_max)
    scores_prefix = scores_prefix.masked_fill(~state.valid[index][:, None, :], -torch.inf)
    scores_self = (q * k_self).sum(-1, keepdim=True)  # (rows, heads, 1)
    return (torch.cat([scores_prefix, scores_self], dim=-1) * scale).softmax(dim=-1)


def attend(weights: Tensor, v_self: Tensor, state: KV, index: Tensor) -> Tensor:
    """(rows, heads, T_max + 1) weights, (rows, heads, head_dim) own value -> (rows, heads, head_dim) output.

    The prefix weights are spread over a one-hot prompt axis (rows, P, heads, T_max), again instead of copying
    each row's values.
    """
    onehot = F.one_hot(index, len(state.v)).to(weights.dtype)  # (rows, P)
    spread = onehot[:, :, None, None] * weights[:, None, :, :-1]  # (rows, P, heads, T_max)
    return torch.einsum("rpht,phtd->rhd", spread, state.v) + weights[..., -1:] * v_self


class TransformerAdapter(Adapter):
    """What the transformer adapters share: a KV prefix state, and their attention weights as token mixing.

    Subclasses give `_qkv(layer, x, positions)` -> q, k, v (n, heads, head_dim) of block inputs x (n, d_model) at
    `positions` (n,), and `_scaling(layer)`, the factor of q . k before the softmax.
    """

    token_mixing_kind = "attention weights of the last position, heads averaged"

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

    def _attend(self, layer: int, h: Tensor, state: KV, index: Tensor) -> Tensor:
        """(rows, d_model) block inputs at the last position -> (rows, heads * head_dim) attention output."""
        q, k, v = self._qkv(layer, h, state.position[index])
        w = last_position_weights(q, k, state, index, self._scaling(layer))  # (rows, heads, T_max + 1)
        return attend(w, v, state, index).reshape(len(h), -1)
