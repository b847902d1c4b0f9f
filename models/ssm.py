"""What the state-space adapters (Mamba, Falcon-Mamba, Mamba-2) share: the selective scan in one common form.

Every one of them mixes tokens with a selective scan over the d_inner channels of the SSM input x. The channels
are grouped into H decay units of P = d_inner / H channels each (Mamba and Falcon-Mamba: one unit per channel,
P = 1; Mamba-2: one unit per head, P = head_dim), and the units into G groups that share B and C (Mamba: G = 1;
Mamba-2: n_groups). With u(c) = c // P the unit of channel c and g(u) = u // (H / G) its group:

    h_t[c] = exp(Delta_t[u] A[u]) h_{t-1}[c] + Delta_t[u] B_t[g] x_t[c]      (h_t[c] has d_state entries)
    y_t[c] = C_t[g] . h_t[c] + D[u] x_t[c]

where exp(Delta A) acts entry by entry (A[u] has d_state entries, or one shared by all of them for Mamba-2).
The neurons are y scaled position by position: neurons_t = y_t * g_t with g from `SSMAdapter.neuron_factor`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from models.base import Adapter

SCAN_ELEMENTS = 2**24  # at most this many (prompts, T, units, d_state) decay weights at once in `final_states`
STATE_ELEMENTS = 2**19  # at most this many (prompts, T, d_inner, d_state) state entries at once in `outputs`


@dataclass
class SSMInputs:
    """The selective scan of one layer along T positions, in the common form above (the fields may also carry a
    leading prompt dimension P: xs (P, T, conv channels) and so on; A and D never do).

    xs: (T, conv channels) what enters the causal depthwise conv (what the conv window keeps)
    u:  (T, d_inner) SSM input x (after the conv and SiLU)
    z:  (T, d_inner) gate, the input of `neuron_factor`
    dt: (T, H) step size Delta of each unit (after softplus, and for Mamba-2 its bias and clamp)
    B:  (T, G, d_state) input matrix;  C: (T, G, d_state) output matrix
    A:  (H, d_state) or (H, 1) = -exp(A_log), negative;  D: (H,) skip connection
    Discretisation (zero-order hold as in the reference code): Abar_t = exp(Delta_t A), Bbar_t = Delta_t B_t.
    """

    xs: Tensor
    u: Tensor
    z: Tensor
    dt: Tensor
    B: Tensor
    C: Tensor
    A: Tensor
    D: Tensor

    def prompts(self, rows: slice) -> SSMInputs:
        """The scan of some of the prompts (the fields' leading dimension P)."""
        return SSMInputs(self.xs[rows], self.u[rows], self.z[rows], self.dt[rows], self.B[rows], self.C[rows], self.A,
                         self.D)

    def group(self, units: slice | Tensor) -> Tensor:
        """(c,) the B / C group of some decay units (units are split evenly over the groups, in order)."""
        H, G = self.dt.shape[-1], self.B.shape[-2]
        return (torch.arange(H, device=self.dt.device) // (H // G))[units]

    def channel_units(self) -> Tensor:
        """(d_inner,) the decay unit of every channel."""
        return torch.arange(self.u.shape[-1], device=self.u.device) // (self.u.shape[-1] // self.dt.shape[-1])

    def output(self) -> Tensor:
        """(T, d_inner) the scan output y at every position, by the recurrence of the module docstring."""
        unit = self.channel_units()
        dt, A, B, C = self.dt[:, unit], self.A[unit], self.B[:, self.group(unit)], self.C[:, self.group(unit)]
        h = self.u.new_zeros(B.shape[1:])  # (d_inner, d_state)
        ys = []
        for t in range(len(self.u)):
            h = torch.exp(dt[t, :, None] * A) * h + dt[t, :, None] * B[t] * self.u[t, :, None]
            ys.append((C[t] * h).sum(-1))
        return torch.stack(ys) + self.D[unit] * self.u

    def alpha_last(self, units: slice | Tensor) -> Tensor:
        """The last row alpha_{T-1, j} of the hidden attention (Ali et al. 2024) of some decay units: (c, T).

        alpha_{T-1,j}[u] = sum_n C_{T-1}[n] exp(sum_{k=j+1..T-1} Delta_k[u] A[u,n]) Delta_j[u] B_j[n]; the
        segment sums are suffix sums, each summed from its own terms.
        """
        dt = self.dt[:, units]  # (T, c)
        x = dt[..., None] * self.A[units]  # (T, c, d_state or 1) log-decay of each step
        suffix = torch.cat([x[1:].flip(0).cumsum(0).flip(0), torch.zeros_like(x[:1])])  # sum_{k=j+1..T-1} x_k
        CB = self.C[-1] * self.B  # (T, G, d_state) C_{T-1}[n] B_j[n]
        if x.shape[-1] == 1:  # one decay for all state entries (Mamba-2): contract the state first
            CB = CB.sum(-1, keepdim=True)
        return torch.einsum("jcn,jcn->cj", torch.exp(suffix), CB[:, self.group(units)]) * dt.T

    def final_states(self, before: Tensor) -> Tensor:
        """(P, H, channels per unit, d_state) the state h after the first before[p] positions of each prompt
        (zero where before[p] = 0); the fields carry the prompt dimension P, T >= before.max(), before (P,).

        A vectorised scan: h = sum_{j < before} exp(sum_{k=j+1..before-1} Delta_k A) Delta_j B_j x_j, with Delta
        set to 0 from `before` on (decay exp(0) = 1, input 0), so every prompt's segment sums are suffix sums of
        one (P, T) array, each summed from its own terms (no differences of cumulative sums). Prompts go in
        chunks of at most SCAN_ELEMENTS decay weights.
        """
        P, T, H = self.dt.shape
        keep = torch.arange(T, device=self.dt.device) < before[:, None]  # (P, T)
        dt = self.dt * keep[..., None]  # (P, T, H)
        x = self.u.unflatten(-1, (H, -1))  # (P, T, H, channels per unit)
        B = self.B[:, :, self.group(slice(None))]  # (P, T, H, d_state)
        chunk = max(1, SCAN_ELEMENTS // (T * H * self.A.shape[-1]))
        states = []
        for p in range(0, P, chunk):
            d = dt[p : p + chunk]
            log_decay = d[..., None] * self.A  # (n, T, H, d_state or 1)
            suffix = torch.cat([log_decay[:, 1:].flip(1).cumsum(1).flip(1), torch.zeros_like(log_decay[:, :1])], 1)
            weight = torch.exp(suffix) * d[..., None] * B[p : p + chunk]  # (n, T, H, d_state)
            states.append(torch.einsum("ptun,ptuc->pucn", weight, x[p : p + chunk]))
        return torch.cat(states)

    def states(self, initial: Tensor | None = None) -> Tensor:
        """(T, P, G, H/G, channels per unit, d_state) the state h_t after every position, time-major (units split
        as (groups, units per group)); the fields carry the prompt dimension P. initial: the state before the first
        position, (P, H, channels per unit, d_state) or another shape of those entries in that order (Mamba's
        (P, d_inner, d_state)); None: zeros (the sequence starts here).

        The recurrence h_t = exp(Delta_t A) h_{t-1} + Delta_t B_t x_t step by step as the reference code, with the
        factors of every step built at once straight into a time-major, contiguous layout (B broadcast over a
        group's units instead of copied per unit): a step is one fused multiply-add.
        """
        H, G = self.dt.shape[2], self.B.shape[-2]
        dt = self.dt.transpose(0, 1).unflatten(-1, (G, -1))  # (T, P, G, H/G)
        x = self.u.transpose(0, 1).unflatten(-1, (G, H // G, -1))  # (T, P, G, H/G, c) c channels per unit
        B = self.B.transpose(0, 1)  # (T, P, G, d_state)
        A = self.A.unflatten(0, (G, -1))  # (G, H/G, d_state or 1)
        decay = torch.exp(dt[..., None] * A)[..., None, :]  # (T, P, G, H/G, 1, d_state or 1)
        states = (dt[..., None, None] * x[..., None]) * B[:, :, :, None, None, :]  # (T, P, G, H/G, c, d_state)
        if initial is not None:
            states[0].addcmul_(decay[0], initial.reshape(states.shape[1:]))
        h = states[0]
        for t in range(1, len(states)):
            h = torch.addcmul(states[t], decay[t], h, out=states[t])
        return states

    def outputs(self, initial: Tensor | None = None) -> Tensor:
        """(P, T, d_inner) the scan output y at every position (with the D skip, before the gate), from the state
        `initial` before the first position (see `states`; None: zeros); the fields carry the prompt dimension P.
        The readout y_t = C_t . h_t + D x_t of every step is one batched product (C broadcast over a group's units).
        """
        n_prompts, T, d_inner = self.u.shape
        chunk = max(1, STATE_ELEMENTS // (T * d_inner * self.A.shape[-1]))
        if n_prompts > chunk:  # prompts in chunks whose states stay a few MB, not one (T, P, d_inner, d_state) array
            return torch.cat([self.prompts(slice(p, p + chunk)).outputs(None if initial is None else
                                                                        initial[p : p + chunk])
                              for p in range(0, n_prompts, chunk)])
        C = self.C.transpose(0, 1)  # (T, P, G, d_state)
        y = torch.matmul(self.states(initial).flatten(3, 4), C[..., None])[..., 0]  # (T, P, G, H/G * c)
        y = y.flatten(2).transpose(0, 1)  # (P, T, d_inner)
        return y + self.D.repeat_interleave(self.u.shape[-1] // self.dt.shape[-1]) * self.u


def causal_conv(xs: Tensor, conv: nn.Conv1d, window: Tensor | None = None) -> Tensor:
    """The depthwise causal conv of the mixers: xs (..., T, channels) -> (..., T, channels). window: the inputs of
    the d_conv - 1 positions before the first, (..., d_conv - 1, channels) (see `conv_window`); None: zeros (the
    sequence starts here)."""
    T, channels = xs.shape[-2:]
    k = conv.kernel_size[0]
    if window is None:
        window = xs.new_zeros(*xs.shape[:-2], k - 1, channels)
    flat = torch.cat([window, xs], -2).reshape(-1, k - 1 + T, channels).transpose(1, 2)  # (n, channels, k - 1 + T)
    out = F.conv1d(flat, conv.weight, conv.bias, groups=channels)  # (n, channels, T)
    return out.transpose(1, 2).reshape(xs.shape)


def conv_window(xs: Tensor, before: Tensor, k: int) -> Tensor:
    """(P, k - 1, channels) the conv inputs of the k - 1 positions before position before[p] of each prompt, from
    xs (P, T, channels), before (P,); positions before the start count as zeros."""
    padded = F.pad(xs, (0, 0, k - 1, 0))  # position t of xs is k - 1 + t of padded
    positions = before[:, None] + torch.arange(k - 1, device=xs.device)  # (P, k - 1) in padded
    return padded[torch.arange(len(xs), device=xs.device)[:, None], positions]


def conv_prefix(window: Tensor, conv: nn.Conv1d) -> Tensor:
    """What the causal conv takes from the positions of a window (P, k - 1, channels) (`conv_window`): (P, channels);
    the next position's conv output is this plus the last tap times its own input."""
    out = torch.einsum("pic,ci->pc", window, conv.weight[:, 0, :-1])  # the taps of the previous positions
    return out + conv.bias if conv.bias is not None else out


class SSMAdapter(Adapter):
    """An adapter of a model whose blocks mix tokens by a selective scan (see the module docstring)."""

    def ssm_inputs(self, layer: int, x: Tensor, window: Tensor | None = None) -> SSMInputs:
        """x: (T, d_model) block inputs of a whole sequence, or (P, T, d_model) of P right-padded ones -> the
        scan's inputs at every position. window: (P, d_conv - 1, conv channels) the conv inputs of the positions
        before the first (`causal_conv`); None: the sequences start at their first position."""
        raise NotImplementedError

    def _state(self, conv: Tensor, ssm: Tensor, window: Tensor):
        """The adapter's state of P prompts from conv (P, channels) (`conv_prefix`), ssm (P, H, channels per unit,
        d_state) and the conv window (P, d_conv - 1, channels) it was summed from."""
        raise NotImplementedError

    def layer_states(self, layer: int, x: Tensor, before: Tensor):
        s = self.ssm_inputs(layer, x)
        conv = self.layers[layer].mixer.conv1d
        window = conv_window(s.xs, before, conv.kernel_size[0])
        return self._state(conv_prefix(window, conv), s.final_states(before), window)

    def position_states(self, layer: int, x: Tensor) -> list:
        """The conv window and SSM state before every position t of x (P, T, d_model): one scan of the sequences
        (`SSMInputs.states`), the windows views of their conv inputs."""
        s = self.ssm_inputs(layer, x)
        conv = self.layers[layer].mixer.conv1d
        padded = F.pad(s.xs, (0, 0, conv.kernel_size[0] - 1, 0))  # position t of xs is k - 1 + t of padded
        states = s.states().flatten(2, 3)  # (T, P, H, channels per unit, d_state)
        out = []
        for t in range(x.shape[1]):
            window = padded[:, t : t + conv.kernel_size[0] - 1]
            out.append(self._state(conv_prefix(window, conv), states[t - 1] if t else torch.zeros_like(states[0]),
                                   window))
        return out

    def extend(self, layer: int, state, index: Tensor, h: Tensor):
        """Each row's conv window and SSM state after its prompt's prefix and its n positions h (rows, n, d_model)."""
        conv = self.layers[layer].mixer.conv1d
        s = self.ssm_inputs(layer, h, state.window[index])
        window = torch.cat([state.window[index], s.xs], 1)[:, -(conv.kernel_size[0] - 1) :]
        return self._state(conv_prefix(window, conv), s.states(state.ssm[index])[-1].flatten(1, 2), window)

    def run_block(self, layer: int, h: Tensor, state, index: Tensor) -> Tensor:
        """As `Adapter.run_block`: the conv and the scan continue each row's prompt's window and SSM state."""
        return self._block(layer, h, state.window[index], state.ssm[index])

    def _block(self, layer: int, h: Tensor, window: Tensor | None = None, initial: Tensor | None = None) -> Tensor:
        """(P, T, d_model) block inputs -> outputs h + project(layer, y * neuron_factor(layer, y, z)), y the scan
        output at every position (`SSMInputs.outputs`) from the conv window and SSM state before the first
        (None: the sequences start there); the neurons go through `neuron_module`, so its hooks fire."""
        s = self.ssm_inputs(layer, h, window)
        y = s.outputs(initial)  # (P, T, d_inner)
        return h + self.project(layer, y * self.neuron_factor(layer, y, s.z))

    def logits(self, input_ids: Tensor, attention_mask: Tensor | None = None,
               positions: Tensor | None = None) -> Tensor:
        """The model's logits (P, T, vocab) of right-padded prompts (P, T), or (P, n, vocab) at `positions` (n,),
        recomputed block by block from the weights (`_block`); the neurons go through `neuron_module`, so its hooks
        fire as in the model's own forward. The mask is not needed: a position never reads the pads after it."""
        h = self.model.get_input_embeddings()(input_ids)  # (P, T, d_model)
        for layer in range(self.n_layers):
            h = self._block(layer, h)
        return self.head(h if positions is None else h[:, positions])

    token_mixing_kind = "hidden attention: mean |alpha_{T-1, j}| over decay units, normalised to sum 1"
    mixing_site = "selective-scan output y (with D x) before the gate; restored under the running forward's gate"

    def token_mixing(self, input_ids: Tensor) -> Tensor:
        inputs, _, _ = self.block_io(input_ids)
        rows = [self.ssm_inputs(layer, x).alpha_last(slice(None)).abs().mean(0) for layer, x in enumerate(inputs)]
        mixing = torch.stack(rows)  # (n_layers, T)
        return mixing / mixing.sum(-1, keepdim=True)

    def gate_of(self, layer: int, projected: Tensor) -> Tensor:
        """The gate z (..., d_inner) from the mixer's in_proj output (..., in_proj width)."""
        raise NotImplementedError

    def knockout_output(self, layer: int, x: Tensor, blocked: Tensor) -> Tensor:
        """The last position's y_{T-1} = sum_j alpha_{T-1,j} x_j + D x_{T-1} without the blocked j's terms."""
        s = self.ssm_inputs(layer, x)
        unit = s.channel_units()
        alpha = s.alpha_last(slice(None))[unit]  # (d_inner, T)
        y = (alpha * s.u.T).masked_fill(blocked[None], 0.0).sum(-1) + s.D[unit] * s.u[-1]  # (d_inner,)
        neurons = y[None] * self.neuron_factor(layer, y[None], s.z[-1:])
        return x[-1] + self.project(layer, neurons)[0]

    def record_hooks(self, layer: int, site: str, store: list[Tensor]) -> list[RemovableHandle]:
        """As `Adapter.record_hooks`; the token-mixing site is the scan output y before the gate (batch, T, d_inner),
        computed from the block's input by `SSMInputs.output`."""
        if site != "token_mixing":
            return super().record_hooks(layer, site, store)

        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            store.append(torch.stack([self.ssm_inputs(layer, row).output() for row in x.detach()]))

        return [self.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)]

    def restore_hooks(self, layer: int, site: str, rows: Tensor, positions: Tensor,
                      clean: Tensor) -> list[RemovableHandle]:
        """As `Adapter.restore_hooks`; restoring y (token mixing) at a position sets the neurons there to
        clean_y * neuron_factor(clean_y, z) with the gate z of the running forward (read from in_proj)."""
        if site != "token_mixing":
            return super().restore_hooks(layer, site, rows, positions, clean)
        gate: list[Tensor] = []

        def read_gate(module, args, output):
            gate.append(self.gate_of(layer, output)[rows, positions])

        def restore(module, args):
            neurons = args[0].clone()
            y = clean.to(neurons.dtype)
            neurons[rows, positions] = y * self.neuron_factor(layer, y, gate.pop())
            return (neurons, *args[1:])

        mixer = self.layers[layer].mixer
        return [mixer.in_proj.register_forward_hook(read_gate),
                self.neuron_module(layer).register_forward_pre_hook(restore)]

    def neuron_factor(self, layer: int, y: Tensor, z: Tensor) -> Tensor:
        """The factor g (n, d_inner) with neurons = y * g at n positions, from the scan output y and gate z.

        g may depend on y, but only through one number per position (and group), so with the clean y's
        factor a split of y over input tokens splits the neurons too.
        """
        raise NotImplementedError
