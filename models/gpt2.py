"""GPT-2: the neurons of layer l are the input of `transformer.h[l].mlp.c_proj`, i.e. GELU(c_fc(ln_2(m))),
width n_inner (3072 for gpt2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from errors import UserError
from models.base import Adapter


@dataclass
class KV:
    """GPT-2 keys and values of the positions before the last: (heads, T-1, head_dim) each."""

    k: Tensor
    v: Tensor


class GPT2Adapter(Adapter):
    neuron_site = "transformer.h[l].mlp.c_proj input (after GELU)"

    def __init__(self, model: nn.Module):
        cfg = model.config
        if getattr(cfg, "add_cross_attention", False):
            raise UserError("GPT-2 models with cross-attention are not supported")
        self.n_heads = cfg.n_head
        super().__init__(model)
        self.head_dim = cfg.n_embd // cfg.n_head

    def _layers(self) -> nn.ModuleList:
        return self.model.transformer.h

    def _width(self) -> int:
        cfg = self.model.config
        return cfg.n_inner or 4 * cfg.n_embd

    def neuron_module(self, layer: int) -> nn.Module:
        return self.layers[layer].mlp.c_proj

    def final_norm(self) -> nn.Module:
        return self.model.transformer.ln_f

    def _scaling(self, layer: int) -> float:
        cfg = self.model.config
        scale = self.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        return scale / (layer + 1) if cfg.scale_attn_by_inverse_layer_idx else scale

    def _qkv(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (n, d_model) -> q, k, v: (n, heads, head_dim)."""
        block = self.layers[layer]
        q, k, v = block.attn.c_attn(block.ln_1(x)).split(self.model.config.n_embd, dim=-1)
        return (t.view(-1, self.n_heads, self.head_dim) for t in (q, k, v))

    def layer_state(self, layer: int, x: Tensor) -> KV:
        _, k, v = self._qkv(layer, x)
        return KV(k.transpose(0, 1), v.transpose(0, 1))

    def attention_weights(self, layer: int, q: Tensor, k_self: Tensor, state: KV) -> Tensor:
        """Softmax weights of the last position over [prefix..., itself]: (rows, heads, T)."""
        scores_prefix = torch.einsum("rhd,htd->rht", q, state.k)  # (rows, heads, T-1)
        scores_self = (q * k_self).sum(-1, keepdim=True)  # (rows, heads, 1)
        scores = torch.cat([scores_prefix, scores_self], dim=-1) * self._scaling(layer)
        return scores.softmax(dim=-1)

    def last_position_attention(self, input_ids: Tensor) -> Tensor:
        """input_ids (T,) -> (n_layers, heads, T): every layer's attention weights of the last position."""
        inputs, _, _ = self.block_io(input_ids)
        rows = []
        with torch.no_grad():
            for layer, x in enumerate(inputs):  # x: (T, d_model) block input
                q, k, _ = self._qkv(layer, x[-1:])  # (1, heads, head_dim) each
                rows.append(self.attention_weights(layer, q, k, self.layer_state(layer, x[:-1]))[0])
        return torch.stack(rows)

    def pre_neurons(self, layer: int, h: Tensor, state: KV) -> tuple[Tensor, Tensor]:
        block = self.layers[layer]
        q, k, v = self._qkv(layer, h)
        w = self.attention_weights(layer, q, k, state)  # (rows, heads, T)
        out = torch.einsum("rht,htd->rhd", w[..., :-1], state.v) + w[..., -1:] * v  # (rows, heads, head_dim)
        m = h + block.attn.c_proj(out.reshape(h.shape[0], -1))
        return m, block.mlp.act(block.mlp.c_fc(block.ln_2(m)))


