"""GPT-NeoX (Pythia): the neurons of layer l are the input of `gpt_neox.layers[l].mlp.dense_4h_to_h`, i.e.
act(dense_h_to_4h(post_attention_layernorm(.))), width intermediate_size (3072 for pythia-160m).

A block is x + attn(ln_1(x)) + mlp(ln_2(x)) with the parallel residual (Pythia's default), or
m = x + attn(ln_1(x)), m + mlp(ln_2(m)) without it. Queries and keys carry rotary embeddings (RoPE, Su et al.)
on the first `partial_rotary_factor` of each head's dimensions; the fused query_key_value projection is laid
out head by head, [q | k | v] within each head.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.attention import KV, TransformerAdapter


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on the first cos.shape[-1] dimensions of x (n, heads, head_dim); cos, sin: (n, rotary_dim)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    turned = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)  # "rotate_half"
    return torch.cat([x_rot * cos[:, None] + turned * sin[:, None], x_pass], dim=-1)


class GPTNeoXAdapter(TransformerAdapter):
    neuron_site = "gpt_neox.layers[l].mlp.dense_4h_to_h input (after the activation)"

    def __init__(self, model: nn.Module):
        cfg = model.config
        self.n_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        super().__init__(model)

    def _layers(self) -> nn.ModuleList:
        return self.model.gpt_neox.layers

    def _width(self) -> int:
        return self.model.config.intermediate_size

    def neuron_module(self, layer: int) -> nn.Module:
        return self.layers[layer].mlp.dense_4h_to_h

    def final_norm(self) -> nn.Module:
        return self.model.gpt_neox.final_layer_norm

    def _qkv(self, layer: int, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (n, d_model) at `positions` (n,) -> q, k (rotated), v: (n, heads, head_dim)."""
        block = self.layers[layer]
        qkv = block.attention.query_key_value(block.input_layernorm(x)).view(len(x), self.n_heads, 3 * self.head_dim)
        q, k, v = qkv.chunk(3, dim=-1)
        cos, sin = self.model.gpt_neox.rotary_emb(x, positions[None])  # (1, n, rotary_dim) each
        return _rotate(q, cos[0], sin[0]), _rotate(k, cos[0], sin[0]), v

    def _scaling(self, layer: int) -> float:
        return self.head_dim**-0.5

    def mixing_module(self, layer: int) -> nn.Module:
        return self.layers[layer].attention.dense  # its output is the attention module's

    def pre_neurons(self, layer: int, h: Tensor, state: KV, index: Tensor,
                    blocked: Tensor | None = None) -> tuple[Tensor, Tensor]:
        block = self.layers[layer]
        m = h + block.attention.dense(self._attend(layer, h, state, index, blocked))
        mlp_in = block.post_attention_layernorm(h if self.model.config.use_parallel_residual else m)
        return m, block.mlp.act(block.mlp.dense_h_to_4h(mlp_in))
