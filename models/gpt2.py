"""GPT-2: the neurons of layer l are the input of `transformer.h[l].mlp.c_proj`, i.e. GELU(c_fc(ln_2(m))),
width n_inner (3072 for gpt2)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from errors import UserError
from models.attention import KV, attend, last_position_weights
from models.base import Adapter


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
        return KV.of(k, v)

    def stack_states(self, states: list[KV]) -> KV:
        return KV.stack(states)

    token_mixing_kind = "attention weights of the last position, heads averaged"

    def token_mixing(self, input_ids: Tensor) -> Tensor:
        return self.last_position_attention(input_ids).mean(1)

    def last_position_attention(self, input_ids: Tensor) -> Tensor:
        """input_ids (T,) -> (n_layers, heads, T): every layer's attention weights of the last position."""
        inputs, _, _ = self.block_io(input_ids)
        rows = []
        index = torch.zeros(1, dtype=torch.long, device=self.device)
        with torch.no_grad():
            for layer, x in enumerate(inputs):  # x: (T, d_model) block input
                q, k, _ = self._qkv(layer, x[-1:])  # (1, heads, head_dim) each
                state = self.layer_state(layer, x[:-1])
                rows.append(last_position_weights(q, k, state, index, self._scaling(layer))[0])
        return torch.stack(rows)

    def pre_neurons(self, layer: int, h: Tensor, state: KV, index: Tensor) -> tuple[Tensor, Tensor]:
        block = self.layers[layer]
        q, k, v = self._qkv(layer, h)
        w = last_position_weights(q, k, state, index, self._scaling(layer))  # (rows, heads, T_max + 1)
        out = attend(w, v, state, index)  # (rows, heads, head_dim)
        m = h + block.attn.c_proj(out.reshape(h.shape[0], -1))
        return m, block.mlp.act(block.mlp.c_fc(block.ln_2(m)))


