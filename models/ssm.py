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
from torch import Tensor

from models.base import Adapter


@dataclass
class SSMInputs:
    """The selective scan of one layer along T positions, in the common form above.

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

    def group(self, units: slice | Tensor) -> Tensor:
        """(c,) the B / C group of some decay units (units are split evenly over the groups, in order)."""
        H, G = self.dt.shape[1], self.B.shape[1]
        return (torch.arange(H, device=self.dt.device) // (H // G))[units]

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


class SSMAdapter(Adapter):
    """An adapter of a model whose blocks mix tokens by a selective scan (see the module docstring)."""

    def ssm_inputs(self, layer: int, x: Tensor) -> SSMInputs:
        """x: (T, d_model) block inputs of a whole sequence -> the scan's inputs at every position."""
        raise NotImplementedError

    token_mixing_kind = "hidden attention: mean |alpha_{T-1, j}| over decay units, normalised to sum 1"

    def token_mixing(self, input_ids: Tensor) -> Tensor:
        inputs, _, _ = self.block_io(input_ids)
        rows = [self.ssm_inputs(layer, x).alpha_last(slice(None)).abs().mean(0) for layer, x in enumerate(inputs)]
        mixing = torch.stack(rows)  # (n_layers, T)
        return mixing / mixing.sum(-1, keepdim=True)

    def neuron_factor(self, layer: int, y: Tensor, z: Tensor) -> Tensor:
        """The factor g (n, d_inner) with neurons = y * g at n positions, from the scan output y and gate z.

        g may depend on y, but only through one number per position (and group), so with the clean y's
        factor a split of y over input tokens splits the neurons too.
        """
        raise NotImplementedError
