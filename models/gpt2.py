"""GPT-2: the neurons of layer l are the input of `transformer.h[l].mlp.c_proj`, i.e. GELU(c_fc(ln_2(m))),
width n_inner (3072 for gpt2)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from common.errors import UserError
from models.attention import KV, TransformerAdapter


class GPT2Adapter(TransformerAdapter):
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

    def _qkv(self, layer: int, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (n, d_model) -> q, k, v: (n, heads, head_dim); positions are in x already (learned embeddings)."""
        block = self.layers[layer]
        q, k, v = block.attn.c_attn(block.ln_1(x)).split(self.model.config.n_embd, dim=-1)
        return (t.view(-1, self.n_heads, self.head_dim) for t in (q, k, v))

    def mixing_module(self, layer: int) -> nn.Module:
        return self.layers[layer].attn.c_proj  # its output is the attention module's (resid_dropout: eval mode)

    def pre_neurons(self, layer: int, h: Tensor, state: KV, index: Tensor,
                    blocked: Tensor | None = None) -> tuple[Tensor, Tensor]:
        block = self.layers[layer]
        m = h + block.attn.c_proj(self._attend(layer, h, state, index, blocked))
        return m, self._activation(block.mlp.act, block.mlp.c_fc(block.ln_2(m)))

    @staticmethod
    def _activation(act: nn.Module, x: Tensor) -> Tensor:
        """The MLP's activation; GPT-2's "gelu_new" (tanh GELU written out in five elementwise ops) as torch's
        fused tanh GELU, the same formula in one pass forward and one backward."""
        from transformers.activations import NewGELUActivation  # deferred: importing transformers costs seconds

        return F.gelu(x, approximate="tanh") if type(act) is NewGELUActivation else act(x)


