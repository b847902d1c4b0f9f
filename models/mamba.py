"""Mamba (Gu & Dao 2023): the neurons of layer l are the input of `backbone.layers[l].mixer.out_proj`, i.e.
the gated SSM output y * silu(z), width d_inner (1536 for mamba-130m)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.ssm import SSMAdapter, SSMInputs, causal_conv


@dataclass
class ConvSSMState:
    """Mamba state after a prefix (the attribution: position T-2, before the last), for P prompts.

    conv:   (P, d_inner) what the causal conv takes from the prefix (its d_conv - 1 last inputs times the kernel's
            taps, plus the bias): the next position's conv output is conv + w_last * xs_next.
    ssm:    (P, d_inner, d_state) the SSM state after the prefix (h_{T-2}).
    window: (P, d_conv - 1, d_inner) those d_conv - 1 conv inputs (zeros before the start), for `run_block`.
    """

    conv: Tensor
    ssm: Tensor
    window: Tensor


class MambaAdapter(SSMAdapter):
    neuron_site = "backbone.layers[l].mixer.out_proj input (y * silu(z))"

    def _layers(self) -> nn.ModuleList:
        return self.model.backbone.layers

    def _width(self) -> int:
        return self.model.config.intermediate_size

    def neuron_module(self, layer: int) -> nn.Module:
        return self.layers[layer].mixer.out_proj

    def final_norm(self) -> nn.Module:
        return self.model.backbone.norm_f

    def neuron_factor(self, layer: int, y: Tensor, z: Tensor) -> Tensor:
        return F.silu(z)

    def gate_of(self, layer: int, projected: Tensor) -> Tensor:
        return projected.chunk(2, dim=-1)[1]  # in_proj(norm(x)) = [x, z]

    def _split(self, mixer: nn.Module, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """u: (n, d_inner) -> Delta (n, d_inner), B (n, d_state), C (n, d_state)."""
        rank, n = mixer.time_step_rank, mixer.ssm_state_size
        dt_low, B, C = mixer.x_proj(u).split([rank, n, n], dim=-1)
        return F.softplus(mixer.dt_proj(dt_low)), B, C

    def ssm_inputs(self, layer: int, x: Tensor, window: Tensor | None = None) -> SSMInputs:
        """x: (T, d_model) or (P, T, d_model) block inputs -> the SSM inputs of every position (window: see
        `SSMAdapter.ssm_inputs`)."""
        block = self.layers[layer]
        mixer = block.mixer
        xs, z = mixer.in_proj(block.norm(x)).chunk(2, dim=-1)  # (..., T, d_inner) each
        u = F.silu(causal_conv(xs, mixer.conv1d, window))
        dt, B, C = self._split(mixer, u)
        return SSMInputs(xs, u, z, dt, B[..., None, :], C[..., None, :], -torch.exp(mixer.A_log), mixer.D)  # 1 group

    def _state(self, conv: Tensor, ssm: Tensor, window: Tensor) -> ConvSSMState:
        return ConvSSMState(conv, ssm[:, :, 0], window)  # one channel per decay unit

    def pre_neurons(self, layer: int, h: Tensor, state: ConvSSMState, index: Tensor) -> tuple[Tensor, Tensor]:
        block = self.layers[layer]
        mixer = block.mixer
        xs, z = mixer.in_proj(block.norm(h)).chunk(2, dim=-1)  # (rows, d_inner)
        u = F.silu(torch.addcmul(state.conv[index], xs, mixer.conv1d.weight[:, 0, -1]))  # SSM input x
        dt, B, C = self._split(mixer, u)
        # y = C . (Abar h + Bbar u) + D u, without the new state: its input part is Delta u (B . C) per channel
        A = -torch.exp(mixer.A_log.detach())  # a weight: no gradient wanted, whatever the model's requires_grad
        y = _DecayedReadout.apply(dt, C, A, state.ssm, index)
        y = y + (dt * (B * C).sum(-1, keepdim=True) + mixer.D) * u  # (rows, d_inner)
        return h, y * F.silu(z)


class _DecayedReadout(torch.autograd.Function):
    """y[r, d] = sum_n C[r, n] exp(Delta[r, d] A[d, n]) h[p_r, d, n]: the previous state's part of one SSM step.

    Delta (rows, d_inner), C (rows, d_state), A (d_inner, d_state), h (P, d_inner, d_state) the prompts' states,
    index (rows,) the prompt p_r of each row -> (rows, d_inner). These elementwise passes over
    (rows, d_inner, d_state), not the matrix products, dominate a Mamba step for hundreds of rows, so the
    decayed states q = exp(Delta A) h are built a block of rows at a time, in cache, and never kept: the forward
    also returns dy/dDelta = sum_n C A q, and the backward builds q again for dy/dC = q. On the CPU a block holds
    up to `ELEMENTS["cpu"]` elements: a run of rows of one prompt (the staircase keeps a prompt's alphas
    together) whose h is broadcast, not gathered per row, or, for runs shorter than a block (small models,
    few alphas), several whole runs with each row's h gathered, so the Python loop goes over blocks, never rows;
    on a GPU, where each block is a kernel launch, blocks are as large as `GATHER_ELEMENTS` allows and gather
    each row's h. Gradients flow to Delta and C only (A is a weight, h a state of the clean
    prompt).
    """

    ELEMENTS: ClassVar[dict[str, int]] = {"cpu": 16 * 1536 * 16}  # by device: elements a block (16 rows at 130M)
    GATHER_ELEMENTS = 2**25  # other devices: elements per (rows, d_state, d_inner) block of gathered states

    @staticmethod
    def forward(ctx, dt: Tensor, C: Tensor, A: Tensor, h: Tensor, index: Tensor) -> Tensor:
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            raise RuntimeError("_DecayedReadout gives no gradient for A or the prefix state")
        # d_inner innermost: the products over d_state then read whole rows of d_inner (fast matrix-vector forms)
        A, h = A.T.contiguous(), h.transpose(1, 2).contiguous()  # (d_state, d_inner), (P, d_state, d_inner)
        y, slope = torch.empty_like(dt), torch.empty_like(dt)  # (rows, d_inner) y and dy/dDelta
        ctx.blocks = _blocks(index, h[0].numel(), dt.device.type)
        for rows, prompts in ctx.blocks:
            q = torch.mul(dt[rows, None, :], A).exp_().mul_(h[prompts])  # (n, d_state, d_inner)
            c = C[rows, None, :]  # (n, 1, d_state)
            torch.bmm(c, q, out=y[rows, None, :])
            torch.bmm(c, q.mul_(A), out=slope[rows, None, :])
        ctx.save_for_backward(dt, A, h, slope)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        dt, A, h, slope = ctx.saved_tensors
        grad_C = dt.new_empty(len(dt), A.shape[0])  # (rows, d_state)
        for rows, prompts in ctx.blocks:
            q = torch.mul(dt[rows, None, :], A).exp_().mul_(h[prompts])
            torch.sum(q.mul_(grad[rows, None, :]), -1, out=grad_C[rows])
        return grad * slope, grad_C, None, None, None


def _blocks(index: Tensor, width: int, device: str) -> list[tuple[slice, int | Tensor]]:
    """index (rows,) -> [(rows, prompts)] blocks of `_DecayedReadout`, `width` = d_state * d_inner elements a row.

    With an ELEMENTS entry for the device, blocks of at most ELEMENTS / width rows: a run of consecutive rows of
    one prompt at least that long is cut into blocks of that prompt (an int); shorter runs are put together,
    whole, into blocks with each row's prompt ((n,) of index). Otherwise: slices of GATHER_ELEMENTS / width rows
    with each row's prompt.
    """
    if device not in _DecayedReadout.ELEMENTS:
        most = max(1, _DecayedReadout.GATHER_ELEMENTS // width)
        return [(slice(s, s + most), index[s : s + most]) for s in range(0, len(index), most)]
    most = max(1, _DecayedReadout.ELEMENTS[device] // width)
    prompts, counts = torch.unique_consecutive(index, return_counts=True)
    blocks: list[tuple[slice, int | Tensor]] = []
    start = pending = 0  # rows [pending, start) are short runs not yet in a block

    def flush(end: int) -> None:
        if pending < end:
            blocks.append((slice(pending, end), index[pending:end]))

    for prompt, n in zip(prompts.tolist(), counts.tolist(), strict=True):
        if n >= most:  # a long run: blocks of its one prompt, whose state is broadcast
            flush(start)
            blocks += [(slice(s, min(s + most, start + n)), prompt) for s in range(start, start + n, most)]
            pending = start + n
        elif start + n - pending > most:  # this short run does not fit the pending block: it starts the next
            flush(start)
            pending = start
        start += n
    flush(start)
    return blocks
