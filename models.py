"""Model loading and the per-architecture adapters: the only module that knows GPT-2 from Mamba.

A "neuron" of layer l is one unit of the input of the block's output projection:
- GPT-2: `transformer.h[l].mlp.c_proj` input, i.e. GELU(c_fc(ln_2(m))), width n_inner (3072 for gpt2);
- Mamba: `backbone.layers[l].mixer.out_proj` input, i.e. the gated SSM output y * silu(z), width d_inner.

Integrated gradients only ever scales the neurons at the last position, so the adapters expose exactly what
that needs (see `Adapter`): the clean prompt's per-layer prefix state, and a single-token `step` through
one block for a batch of rows that share it. Prefix states are computed from the modules' own weights (not
through `transformers`' cache classes, whose API changes between releases) and checked against the model's
own forward.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from errors import UserError

log = logging.getLogger(__name__)

SUPPORTED = ("gpt2", "mamba")


# ----------------------------------------------------------------------------------------------------------
# loading


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is available to torch here; use --device cpu")
    return torch.device(device)


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def load_model(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a GPT-2 or Mamba causal LM and its tokenizer from a local folder or the Hugging Face hub.

    Tries the local folder / local hub cache first; goes to the hub only when it answers. The model is put in
    eval mode (the CUDA Mamba kernels fuse `out_proj` away in training mode) with gradients off for weights.
    Returns (model, tokenizer).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars are over facts; per-file bars are noise
    local = Path(name).expanduser()
    source = str(local) if local.exists() else name
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=True)
        except OSError:
            if local.exists() or not _hub_reachable():
                raise
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as exc:
        if local.exists():
            raise UserError(f"model '{name}': cannot load the folder {local}: {exc}") from exc
        raise UserError(
            f"model '{name}' is not a local folder and the Hugging Face hub cannot provide it "
            "(no network and not in the local cache): pass the path of a downloaded copy "
            "(--gpt2-model PATH / --mamba-model PATH) or use --demo for the built-in demo models"
        ) from exc
    if model.config.model_type not in SUPPORTED:
        kind = model.config.model_type
        raise UserError(f"model '{name}' is a '{kind}' model; only {', '.join(SUPPORTED)} are supported")
    model.to(resolve_device(str(device)) if isinstance(device, str) else device)
    model.eval().requires_grad_(False)
    return model, tokenizer


# ----------------------------------------------------------------------------------------------------------
# the adapter interface


@dataclass
class Prefix:
    """The clean prompt as seen from its last position (T = prompt length).

    states: per-layer state that `step` needs from positions < T-1 (architecture-specific).
    resid:  (n_layers, d_model) residual stream that layer l's output projection is added to, at position T-1.
    acts:   (n_layers, width) neuron activations at position T-1.
    logits: (vocab,) the model's next-token logits at position T-1.
    """

    states: list[Any]
    resid: Tensor
    acts: Tensor
    logits: Tensor


class Adapter:
    """What method code may ask of a model. Subclasses implement the block internals of one architecture."""

    neuron_site: str  # the module whose input holds the neurons, for the output files

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers: nn.ModuleList = self._layers()
        self.n_layers = len(self.layers)
        self.width = self._width()

    # --- architecture-specific -----------------------------------------------------------------------------
    def _layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def _width(self) -> int:
        raise NotImplementedError

    def neuron_module(self, layer: int) -> nn.Module:
        """The output projection whose input holds the neurons of `layer`."""
        raise NotImplementedError

    def layer_state(self, layer: int, x: Tensor) -> Any:
        """State for `pre_neurons` from the block inputs x (T-1, d_model) of the positions before the last."""
        raise NotImplementedError

    def pre_neurons(self, layer: int, h: Tensor, state: Any) -> tuple[Tensor, Tensor]:
        """Run the last token through block `layer` up to its neurons, for a batch of rows.

        h: (rows, d_model) block input at position T-1. Returns (resid (rows, d_model), acts (rows, width)):
        the block output is resid + project(layer, acts).
        """
        raise NotImplementedError

    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    # --- shared --------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def project(self, layer: int, acts: Tensor) -> Tensor:
        """(rows, width) neurons -> (rows, d_model) contribution to the residual stream."""
        return self.neuron_module(layer)(acts)

    def step(self, layer: int, h: Tensor, state: Any) -> Tensor:
        """(rows, d_model) block input at the last position -> (rows, d_model) block output."""
        resid, acts = self.pre_neurons(layer, h, state)
        return resid + self.project(layer, acts)

    def head(self, h: Tensor) -> Tensor:
        """(rows, d_model) last block output -> (rows, vocab) logits."""
        return self.model.get_output_embeddings()(self.final_norm()(h))

    def block_io(self, input_ids: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """One clean forward of the real model. input_ids: (T,).

        Returns (the input of every block, the output of the last block), each (T, d_model), and the logits
        (T, vocab).
        """
        inputs: list[Tensor] = []
        outputs: list[Tensor] = []

        def grab(module, args, kwargs, output):
            inputs.append((args[0] if args else kwargs["hidden_states"])[0].detach())
            outputs.append((output[0] if isinstance(output, tuple) else output)[0].detach())

        handles = [layer.register_forward_hook(grab, with_kwargs=True) for layer in self.layers]
        try:
            with torch.no_grad():
                logits = self.model(input_ids[None].to(self.device), use_cache=False).logits[0]
        finally:
            for handle in handles:
                handle.remove()
        return inputs, outputs[-1], logits

    def prefix(self, input_ids: Tensor) -> Prefix:
        """Per-layer prefix state, last-position residuals and activations of a clean prompt (T,).

        The last position is recomputed with `step` from the real model's block inputs; a mismatch with the
        real forward means this adapter does not cover the model's configuration, and is an error.
        """
        inputs, last_out, logits = self.block_io(input_ids)
        states, resid, acts = [], [], []
        with torch.no_grad():
            for layer, x in enumerate(inputs):
                state = self.layer_state(layer, x[:-1])
                r, a = self.pre_neurons(layer, x[-1:], state)
                states.append(state)
                resid.append(r[0])
                acts.append(a[0])
                expected = inputs[layer + 1][-1] if layer + 1 < self.n_layers else last_out[-1]
                self._check(layer, r[0] + self.project(layer, a[0]), expected)
        return Prefix(states, torch.stack(resid), torch.stack(acts), logits[-1])

    def _check(self, layer: int, ours: Tensor, theirs: Tensor) -> None:
        tol = (1e-6 if self.dtype == torch.float64 else 1e-4) * (1.0 + theirs.abs().max().item())
        err = (ours - theirs).abs().max().item()
        if err > tol:
            raise RuntimeError(
                f"{type(self).__name__}: layer {layer} recomputed from the weights differs from the model's "
                f"forward by {err:.3g} (> {tol:.3g}); this model configuration is not supported by the adapter"
            )


# ----------------------------------------------------------------------------------------------------------
# GPT-2


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


# ----------------------------------------------------------------------------------------------------------
# Mamba


@dataclass
class SSMInputs:
    """The selective SSM's inputs along a sequence of T positions (one layer), as in Gu & Dao 2023.

    xs: (T, d_inner) the in_proj half that enters the causal depthwise conv (what the conv window keeps)
    u:  (T, d_inner) SSM input x: SiLU of the causal depthwise conv of xs
    z:  (T, d_inner) gate (the other in_proj half); the neurons are y * silu(z)
    dt: (T, d_inner) step size Delta = softplus(dt_proj(.) + bias)
    B:  (T, d_state) input matrix;  C: (T, d_state) output matrix
    A:  (d_inner, d_state) = -exp(A_log), negative;  D: (d_inner,) skip connection
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


@dataclass
class ConvSSMState:
    """Mamba state after position T-2.

    conv: (d_inner, d_conv - 1) the last pre-conv inputs (zeros before the start); ssm: (d_inner, d_state).
    """

    conv: Tensor
    ssm: Tensor


class MambaAdapter(Adapter):
    neuron_site = "backbone.layers[l].mixer.out_proj input (y * silu(z))"

    def _layers(self) -> nn.ModuleList:
        return self.model.backbone.layers

    def _width(self) -> int:
        return self.model.config.intermediate_size

    def neuron_module(self, layer: int) -> nn.Module:
        return self.layers[layer].mixer.out_proj

    def final_norm(self) -> nn.Module:
        return self.model.backbone.norm_f

    def _split(self, mixer: nn.Module, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """u: (n, d_inner) -> Delta (n, d_inner), B (n, d_state), C (n, d_state)."""
        rank, n = mixer.time_step_rank, mixer.ssm_state_size
        dt_low, B, C = mixer.x_proj(u).split([rank, n, n], dim=-1)
        return F.softplus(mixer.dt_proj(dt_low)), B, C

    def ssm_inputs(self, layer: int, x: Tensor) -> SSMInputs:
        """x: (T, d_model) block inputs of a whole sequence -> the SSM inputs of every position."""
        block = self.layers[layer]
        mixer = block.mixer
        xs, z = mixer.in_proj(block.norm(x)).chunk(2, dim=-1)  # (T, d_inner) each
        T, k = xs.shape[0], mixer.conv_kernel_size
        conv = F.conv1d(xs.T[None], mixer.conv1d.weight, mixer.conv1d.bias, padding=k - 1, groups=xs.shape[1])
        u = F.silu(conv[0, :, :T].T)
        dt, B, C = self._split(mixer, u)
        return SSMInputs(xs, u, z, dt, B, C, -torch.exp(mixer.A_log), mixer.D)

    def layer_state(self, layer: int, x: Tensor) -> ConvSSMState:
        mixer = self.layers[layer].mixer
        k = mixer.conv_kernel_size
        if not len(x):  # a one-token prompt: nothing before the last position
            return ConvSSMState(x.new_zeros(mixer.intermediate_size, k - 1), x.new_zeros(mixer.A_log.shape))
        s = self.ssm_inputs(layer, x)  # (T-1, ...) the positions before the last
        window = torch.cat([s.xs.new_zeros(max(0, k - 1 - len(x)), s.xs.shape[1]), s.xs[-(k - 1) :]]).T
        ssm = s.xs.new_zeros(s.A.shape)
        for t in range(len(x)):  # h_t = Abar_t h_{t-1} + Bbar_t u_t
            ssm = torch.exp(s.dt[t, :, None] * s.A) * ssm + s.dt[t, :, None] * s.B[t] * s.u[t, :, None]
        return ConvSSMState(window, ssm)

    def pre_neurons(self, layer: int, h: Tensor, state: ConvSSMState) -> tuple[Tensor, Tensor]:
        block = self.layers[layer]
        mixer = block.mixer
        xs, z = mixer.in_proj(block.norm(h)).chunk(2, dim=-1)  # (rows, d_inner)
        window = torch.cat([state.conv.expand(len(h), -1, -1), xs[..., None]], dim=-1)  # (rows, d_inner, d_conv)
        u = (window * mixer.conv1d.weight[:, 0]).sum(-1)
        u = F.silu(u + mixer.conv1d.bias if mixer.conv1d.bias is not None else u)
        dt, B, C = self._split(mixer, u)
        # y = C . (Abar h + Bbar u) + D u, without the new state: its input part is Delta u (B . C) per channel
        y = _DecayedReadout.apply(dt, C, -torch.exp(mixer.A_log), state.ssm)
        y = y + dt * u * (B * C).sum(-1, keepdim=True) + mixer.D * u  # (rows, d_inner)
        return h, y * F.silu(z)


class _DecayedReadout(torch.autograd.Function):
    """y[r, d] = sum_n C[r, n] exp(Delta[r, d] A[d, n]) h[d, n]: the previous state's part of one SSM step.

    Delta (rows, d_inner), C (rows, d_state), A and h (d_inner, d_state) -> (rows, d_inner). Fused so that a
    single (rows, d_inner, d_state) tensor is built and kept for the backward pass: these elementwise passes,
    not the matrix products, dominate a Mamba step for hundreds of rows. Gradients flow to Delta and C only
    (A is a weight, h a state of the clean prompt).
    """

    @staticmethod
    def forward(ctx, dt: Tensor, C: Tensor, A: Tensor, h: Tensor) -> Tensor:
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            raise RuntimeError("_DecayedReadout gives no gradient for A or the prefix state")
        decayed = torch.mul(dt[:, :, None], A).exp_().mul_(h)  # (rows, d_inner, d_state)
        ctx.save_for_backward(C, A, decayed)
        return torch.bmm(decayed, C[:, :, None])[..., 0]

    @staticmethod
    def backward(ctx, grad: Tensor):
        C, A, decayed = ctx.saved_tensors
        grad_C = torch.bmm(grad[:, None, :], decayed)[:, 0]  # (rows, d_state)
        grad_dt = grad * torch.bmm(decayed * A, C[:, :, None])[..., 0]  # (rows, d_inner)
        return grad_dt, grad_C, None, None


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of a `GPT2LMHeadModel` or `MambaForCausalLM`; anything else is a user error."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind == "gpt2":
        return GPT2Adapter(model)
    if kind == "mamba":
        return MambaAdapter(model)
    raise UserError(f"architecture '{kind}' is not supported: only {', '.join(SUPPORTED)} models are")
