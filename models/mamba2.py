"""Mamba-2 (Dao & Gu 2024, SSD): the neurons of layer l are the input of `backbone.layers[l].mixer.out_proj`,
i.e. the gated RMSNorm of the SSM output, norm(y * silu(z)) * weight, width d_inner = expand * hidden_size
(1536 for mamba2-130m).

A block: in_proj(norm(x)) = [z (d_inner), xBC (conv_dim), dt (heads)]; xBC = [x, B, C] goes through the causal
depthwise conv and SiLU; Delta = clamp(softplus(dt + dt_bias), time_step_limit) per head; the scan of each head
(A and D are scalars per head, B and C are shared by the heads of one of n_groups groups) gives y; the gated
RMSNorm normalises y * silu(z) over each of its n_groups channel groups. transformers computes the scan in
chunks (the SSD form); the single-token step here is its recurrence, which is the same map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.ssm import SSMAdapter, SSMInputs, causal_conv


@dataclass
class Mamba2State:
    """Mamba-2 state after a prefix (the attribution: position T-2, before the last), for P prompts.

    conv:   (P, conv_dim) what the causal conv takes from the prefix (its d_conv - 1 last inputs [x, B, C] times
            the kernel's taps, plus the bias): the next position's conv output is conv + w_last * xBC_next.
    ssm:    (P, heads, head_dim, d_state) the SSM state after the prefix (h_{T-2}).
    window: (P, d_conv - 1, conv_dim) those d_conv - 1 conv inputs (zeros before the start), for `run_block`.
    """

    conv: Tensor
    ssm: Tensor
    window: Tensor


class Mamba2Adapter(SSMAdapter):
    neuron_site = "backbone.layers[l].mixer.out_proj input (gated RMSNorm of y * silu(z))"

    def _layers(self) -> nn.ModuleList:
        return self.model.backbone.layers

    def _width(self) -> int:
        return self.layers[0].mixer.intermediate_size

    def neuron_module(self, layer: int) -> nn.Module:
        return self.layers[layer].mixer.out_proj

    def final_norm(self) -> nn.Module:
        return self.model.backbone.norm_f

    def neuron_factor(self, layer: int, y: Tensor, z: Tensor) -> Tensor:
        """weight * silu(z) / rms(y * silu(z)) with the rms over each of the norm's channel groups."""
        norm = self.layers[layer].mixer.norm
        gated = y * F.silu(z)  # (n, d_inner)
        groups = gated.unflatten(-1, (-1, norm.group_size))  # (n, n_groups, group_size)
        scale = torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)  # one number a group
        return norm.weight * F.silu(z) * scale.expand_as(groups).flatten(-2)

    def gate_of(self, layer: int, projected: Tensor) -> Tensor:
        mixer = self.layers[layer].mixer
        return projected.split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], -1)[0]

    def _in_proj(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (..., d_model) block inputs -> z (n, d_inner), xBC (n, conv_dim), dt (n, heads) before the bias."""
        block = self.layers[layer]
        mixer = block.mixer
        return mixer.in_proj(block.norm(x)).split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], -1)

    def _split(self, mixer: nn.Module, xbc: Tensor, dt: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Conv output xbc (n, conv_dim) and raw dt (n, heads) -> x (n, d_inner), B, C (n, n_groups, d_state),
        Delta (n, heads)."""
        groups, n = mixer.n_groups, mixer.ssm_state_size
        x, B, C = mixer.act(xbc).split([mixer.intermediate_size, groups * n, groups * n], dim=-1)
        dt = F.softplus(dt + mixer.dt_bias).clamp(*mixer.time_step_limit)
        return x, B.unflatten(-1, (groups, n)), C.unflatten(-1, (groups, n)), dt

    def ssm_inputs(self, layer: int, x: Tensor, window: Tensor | None = None) -> SSMInputs:
        """x: (T, d_model) or (P, T, d_model) block inputs -> the SSM inputs of every position (window: see
        `SSMAdapter.ssm_inputs`)."""
        mixer = self.layers[layer].mixer
        z, xbc, dt = self._in_proj(layer, x)
        u, B, C, dt = self._split(mixer, causal_conv(xbc, mixer.conv1d, window), dt)
        return SSMInputs(xbc, u, z, dt, B, C, -torch.exp(mixer.A_log)[:, None], mixer.D)

    def _heads(self, mixer: nn.Module, t: Tensor) -> Tensor:
        """(n, n_groups, d_state) -> (n, heads, d_state): the group of each head, as transformers repeats it."""
        return t.repeat_interleave(mixer.num_heads // mixer.n_groups, dim=-2)

    def _state(self, conv: Tensor, ssm: Tensor, window: Tensor) -> Mamba2State:
        return Mamba2State(conv, ssm, window)

    def pre_neurons(self, layer: int, h: Tensor, state: Mamba2State, index: Tensor) -> tuple[Tensor, Tensor]:
        mixer = self.layers[layer].mixer
        heads, p = mixer.num_heads, mixer.head_dim
        z, xbc, dt = self._in_proj(layer, h)  # (rows, d_inner), (rows, conv_dim), (rows, heads)
        conv = torch.addcmul(state.conv[index], xbc, mixer.conv1d.weight[:, 0, -1])  # (rows, conv_dim)
        x, B, C, dt = self._split(mixer, conv, dt)
        B, C, x = self._heads(mixer, B), self._heads(mixer, C), x.unflatten(-1, (heads, p))  # per head
        A = -torch.exp(mixer.A_log.detach())  # (heads,) a weight: no gradient wanted
        # y = C . (exp(Delta A) h + Delta x B) + D x; A is a scalar per head, so the decay factors out of C . h
        y = torch.exp(dt * A)[..., None] * _readout(C, state.ssm, index)
        y = y + (dt * (B * C).sum(-1) + mixer.D)[..., None] * x  # (rows, heads, head_dim)
        return h, mixer.norm(y.flatten(-2), z)


def _readout(C: Tensor, ssm: Tensor, index: Tensor) -> Tensor:
    """C (rows, heads, d_state), the prompts' states ssm (P, heads, head_dim, d_state), index (rows,) ->
    (rows, heads, head_dim) = C_r . h[index_r]: one product per prompt over its rows, never a copy of the state
    per row (a (rows, d_inner, d_state) tensor)."""
    if len(ssm) == 1:
        return torch.einsum("rhn,hpn->rhp", C, ssm[0])
    order = torch.argsort(index, stable=True)  # rows grouped by prompt
    counts = torch.bincount(index, minlength=len(ssm)).tolist()
    parts = [torch.einsum("rhn,hpn->rhp", c, h) for c, h in zip(C[order].split(counts), ssm, strict=True)]
    return torch.cat(parts)[torch.argsort(order)]
