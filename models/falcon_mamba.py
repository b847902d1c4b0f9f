"""Falcon-Mamba (Zuo et al. 2024): Mamba mixers whose B, C and low-rank Delta input are RMS-normalised.

The neurons are those of Mamba (the input of `backbone.layers[l].mixer.out_proj`, y * silu(z), width d_inner,
8192 for falcon-mamba-7b). The only difference inside a block is in the selective projection:
x_proj(x) = [dt_low, B, C] is followed by a weightless RMS norm of each part over its own last dimension
(eps = config.mixer_rms_eps), before dt_proj and softplus make Delta of dt_low.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from models.mamba import MambaAdapter


class FalconMambaAdapter(MambaAdapter):
    def _split(self, mixer: nn.Module, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """u: (n, d_inner) -> Delta (n, d_inner), B (n, d_state), C (n, d_state), each part RMS-normalised.

        The norms are the mixer's own modules (they compute in float32, as the model's forward does).
        """
        rank, n = mixer.time_step_rank, mixer.ssm_state_size
        dt_low, B, C = mixer.x_proj(u).split([rank, n, n], dim=-1)
        dt = F.softplus(mixer.dt_proj(mixer.dt_layernorm(dt_low)))
        return dt, mixer.b_layernorm(B), mixer.c_layernorm(C)
