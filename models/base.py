"""The adapter interface: what method code may ask of a model, whatever its architecture.

Integrated gradients only ever scales the neurons at the last position, so an adapter exposes exactly what
that needs: the clean prompt's per-layer prefix state, and a single-token `step` through one block for a batch
of rows that share it. Causal tracing restores a state at one position t, which changes nothing before t, so it
asks for the same kind of state before every position of its corrupted runs (`position_states`) and runs blocks on
the positions from t on (`run_block`). Prefix states are computed from the modules' own weights (not through
`transformers`' cache classes, whose API changes between releases) and checked against the model's own forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.hooks import RemovableHandle

from models.head import TargetProbability


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block (dropout off; transformers' CUDA Mamba kernels fuse out_proj, the neurons, in
    training mode), then the model's own mode again."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)

@dataclass
class Prefix:
    """P clean prompts as seen from their last positions (prompt p has T_p tokens), all read from the model's own
    forward but the states.

    states:  per layer, the state that `pre_neurons` needs from the positions before the last, of all P prompts
             (architecture-specific; see `Adapter.layer_states`); empty when not asked for.
    acts:    (P, n_layers, width) neuron activations at position T_p - 1.
    outputs: (P, n_layers, d_model) block outputs at T_p - 1 (resid + project(acts) of `pre_neurons`); the last
             layer's give the next-token logits (`head`).
    """

    states: list[Any]
    acts: Tensor
    outputs: Tensor


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

    def layer_states(self, layer: int, x: Tensor, before: Tensor) -> Any:
        """State for `pre_neurons` of P prompts from their right-padded block inputs x (P, T, d_model): prompt p's
        state from its first before[p] positions (those before its last; T > before.max()), for all P at once.

        A dataclass of tensors with a leading prompt dimension P.
        """
        raise NotImplementedError

    def pre_neurons(self, layer: int, h: Tensor, state: Any, index: Tensor) -> tuple[Tensor, Tensor]:
        """Run the last token through block `layer` up to its neurons, for a batch of rows.

        h: (rows, d_model) block input at the last position; state: the layer's states of P prompts;
        index: (rows,) which prompt each row continues. Returns (resid (rows, d_model), acts (rows, width)):
        the block output is resid + project(layer, acts).
        """
        raise NotImplementedError

    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    token_mixing_kind: str  # what `token_mixing` measures, for the output files
    mixing_site: str  # what `mixing_module` outputs (causal tracing's token-mixing site), for the output files

    def token_mixing(self, input_ids: Tensor) -> Tensor:
        """How much the last position reads from each position, per layer: (n_layers, T), rows >= 0 summing to 1.

        input_ids: (T,). A transformer's attention weights, a state-space model's hidden attention.
        """
        raise NotImplementedError

    def mixing_module(self, layer: int) -> nn.Module:
        """The module whose output is the token-mixing site of causal tracing (a transformer's attention output:
        its output projection)."""
        raise NotImplementedError

    def knockout_output(self, layer: int, x: Tensor, blocked: Tensor) -> Tensor:
        """Block `layer`'s output at the last position when the last position may not read `blocked` positions.

        x: (T, d_model) the block inputs of the whole prompt; blocked: (T,) bool. With nothing blocked this is
        the block's own output at T - 1; blocking edits only the last position's token mixing (attention edges,
        hidden-attention terms), so the positions before it are untouched.
        """
        raise NotImplementedError

    def position_states(self, layer: int, x: Tensor) -> list[Any]:
        """The states of P whole sequences of one length, x (P, T, d_model) block inputs, before each position:
        a list of T states (a leading dimension P each), the t-th what `run_block` needs to continue the sequences
        at position t (t = 0: the empty prefix). Causal tracing's corrupted runs, at every position at once."""
        raise NotImplementedError

    def extend(self, layer: int, state: Any, index: Tensor, h: Tensor) -> Any:
        """The states of rows after their prompt's prefix (state of P prompts, index (rows,)) and n more positions
        whose block inputs are h (rows, n, d_model), n >= 1: a state of `rows` prompts for `step` / `run_block`."""
        raise NotImplementedError

    def run_block(self, layer: int, h: Tensor, state: Any, index: Tensor) -> Tensor:
        """Block `layer` on n consecutive positions of each row after a prefix: h (rows, n, d_model) block inputs,
        state the prefix states of P prompts (`position_states` or `layer_states`), index (rows,) the prompt each
        row continues -> (rows, n, d_model) block outputs. Computed from the weights through the modules of the
        "kn_site" and "token_mixing" sites (`site_module`; and `record_hooks` / `restore_hooks`' others), so that
        their forward hooks fire (positions count from the first after the prefix); not through the block itself.
        """
        raise NotImplementedError

    # --- causal tracing: the three restoration sites -------------------------------------------------------
    def site_module(self, layer: int, site: str) -> nn.Module:
        """The module whose output is `site` of `layer`: "residual" the block, "kn_site" the knowledge-neuron
        projection, "token_mixing" `mixing_module`."""
        if site == "residual":
            return self.layers[layer]
        if site == "kn_site":
            return self.neuron_module(layer)
        if site == "token_mixing":
            return self.mixing_module(layer)
        raise ValueError(f"unknown site {site!r}")

    def record_hooks(self, layer: int, site: str, store: list[Tensor]) -> list[RemovableHandle]:
        """Hooks that append the value of `site` at `layer`, (batch, T, d_site), to `store` in every forward."""

        def hook(module, args, output):
            store.append((output[0] if isinstance(output, tuple) else output).detach())

        return [self.site_module(layer, site).register_forward_hook(hook)]

    def restore_hooks(self, layer: int, site: str, rows: Tensor, positions: Tensor,
                      clean: Tensor) -> list[RemovableHandle]:
        """Hooks that replace the value of `site` at `layer` in batch row rows[i], position positions[i] by
        clean[i] (n, d_site) in every forward; everything after is computed from it."""

        def hook(module, args, output):
            value = output[0] if isinstance(output, tuple) else output
            value = value.clone()
            value[rows, positions] = clean.to(value.dtype)
            return (value, *output[1:]) if isinstance(output, tuple) else value

        return [self.site_module(layer, site).register_forward_hook(hook)]

    # --- shared --------------------------------------------------------------------------------------------
    @classmethod
    def max_positions(cls, config: Any) -> int | None:
        """The most positions a model with this config can read (learned position embeddings); None when it has
        no such limit (a recurrent model). Read from the config, so it can be checked before loading weights."""
        for key in ("n_positions", "max_position_embeddings"):
            value = getattr(config, key, None)
            if value:
                return int(value)
        return None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def project(self, layer: int, acts: Tensor) -> Tensor:
        """(rows, width) neurons -> (rows, d_model) contribution to the residual stream."""
        return self.neuron_module(layer)(acts)

    def value_slots(self, layer: int) -> Tensor:
        """(width, d_model) view of the output projection's weight: row i is neuron i's value slot, the vector
        the neuron's activation scales into the residual stream (Geva et al. 2021). Writing into it edits the model.

        nn.Linear stores (out, in), so its slots are the weight's columns; transformers' Conv1D (GPT-2) stores
        (in, out), so its slots are the weight's rows.
        """
        from transformers.pytorch_utils import Conv1D  # deferred: importing transformers costs seconds

        module = self.neuron_module(layer)
        if isinstance(module, nn.Linear):
            return module.weight.T
        if isinstance(module, Conv1D):
            return module.weight
        raise NotImplementedError(f"{type(self).__name__}: no value slots for a {type(module).__name__} projection")

    def output_embedding(self, token: int) -> Tensor:
        """(d_model,) the output-embedding (unembedding) row of `token`: e(y) in Dai et al.'s update rule."""
        return self.model.get_output_embeddings().weight[token]

    def step(self, layer: int, h: Tensor, state: Any, index: Tensor) -> Tensor:
        """(rows, d_model) block input at the last position -> (rows, d_model) block output (see `pre_neurons`)."""
        resid, acts = self.pre_neurons(layer, h, state, index)
        return resid + self.project(layer, acts)

    def logits(self, input_ids: Tensor, attention_mask: Tensor | None = None,
               positions: Tensor | None = None) -> Tensor:
        """(P, T) right-padded token ids and their mask -> (P, T, vocab) the model's logits at every position, or
        (P, n, vocab) at `positions` (n,) only (the LM head runs on those). Hooks on `neuron_module` see the neurons
        of every position (adapters may recompute the forward faster)."""
        keep = {} if positions is None else {"logits_to_keep": positions}
        return self.model(input_ids, attention_mask=attention_mask, use_cache=False, **keep).logits

    def head(self, h: Tensor) -> Tensor:
        """(rows, d_model) last block output -> (rows, vocab) logits."""
        return self.model.get_output_embeddings()(self.final_norm()(h))

    def answer_probability(self, h: Tensor, target: Tensor) -> Tensor:
        """(rows, d_model) last block output, (rows,) token ids -> (rows,) softmax probability of each target.

        Same value as head(h).softmax(-1)[r, target[r]], with a cheaper backward (see `TargetProbability`).
        """
        out = self.model.get_output_embeddings()
        return TargetProbability.apply(self.final_norm()(h), out.weight, out.bias, target)

    def block_io(self, input_ids: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """One clean forward of the real model. input_ids: (T,).

        Returns (the input of every block, the output of the last block), each (T, d_model), and the last
        position's logits (1, vocab) (the LM head runs on that position only).
        """
        inputs, last_out = self._batched_block_io([input_ids])
        with torch.no_grad():
            return [x[0] for x in inputs], last_out[0], self.head(last_out[0, -1:])

    def _batched_block_io(self, prompts: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """One clean forward of P prompts (T_p,) at once, right-padded to T_max: every position a prompt has sees
        only its own tokens (causal models), whatever pads follow it.

        Returns the input of every block and the output of the last block, each (P, T_max, d_model): the forward
        of the base model (without its LM head).
        """
        batch = pad_sequence([ids.to(self.device) for ids in prompts], batch_first=True)  # token 0 pads
        lengths = torch.tensor([len(ids) for ids in prompts], device=self.device)
        # the mask changes no prompt's numbers (the pads follow it); it tells the model where they are, which
        # spares the user transformers' warning about padded inputs without one
        mask = (torch.arange(batch.shape[1], device=self.device) < lengths[:, None]).long()
        inputs: list[Tensor] = []
        outputs: list[Tensor] = []

        def grab(module, args, kwargs, output):
            inputs.append((args[0] if args else kwargs["hidden_states"]).detach())
            outputs.append((output[0] if isinstance(output, tuple) else output).detach())

        handles = [layer.register_forward_hook(grab, with_kwargs=True) for layer in self.layers]
        try:
            with torch.no_grad():
                self.model.base_model(batch, attention_mask=mask, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        return inputs, outputs[-1]

    def prefix(self, input_ids: Tensor, states: bool = True) -> Prefix:
        """`prefixes` of one prompt (T,): P = 1."""
        return self.prefixes([input_ids], states)

    def prefixes(self, prompts: list[Tensor], states: bool = True) -> Prefix:
        """Per-layer prefix states, last-position activations and block outputs of P clean prompts (T_p,) each.

        One forward of the real model gives every block's inputs (P prompts right-padded to T_max) and, by hooks
        on the output projections, the neurons at the last positions. With `states`, each layer's states of all
        prompts come from the block inputs in one batched computation (`layer_states`: no loop over prompts or
        tokens). The adapter's own blocks on those states (`step`) are checked against the forward where they are
        used: the staircase carries the clean last positions along (`check_outputs`), or `verify` runs them
        alone.
        """
        index = torch.arange(len(prompts), device=self.device)
        last = torch.tensor([len(ids) - 1 for ids in prompts], device=self.device)  # (P,)
        neurons: list[Tensor] = []  # per layer (P, width)

        def grab(module, args):
            neurons.append(args[0][index, last].detach())

        handles = [self.neuron_module(layer).register_forward_pre_hook(grab) for layer in range(self.n_layers)]
        try:
            inputs, last_out = self._batched_block_io(prompts)
        finally:
            for handle in handles:
                handle.remove()
        outputs = torch.stack([x[index, last] for x in [*inputs[1:], last_out]], 1)  # (P, n_layers, d_model)
        with torch.no_grad():
            layer_states = [self.layer_states(layer, x, last) for layer, x in enumerate(inputs)] if states else []
        return Prefix(layer_states, torch.stack(neurons, 1), outputs)

    def verify(self, prefix: Prefix) -> None:
        """Step the clean last positions of `prefixes` (with states) through every block above the first, each
        from the forward's output of the block below, and check them against the forward (`check_outputs`): what
        the staircase's clean rows do."""
        index = torch.arange(len(prefix.outputs), device=self.device)
        with torch.no_grad():
            seen = [self.step(layer, prefix.outputs[:, layer - 1], prefix.states[layer], index)
                    for layer in range(1, self.n_layers)]
        if seen:
            self.check_outputs(torch.stack(seen, 1), prefix.outputs[:, 1:], first_layer=1)

    def check_outputs(self, ours: Tensor, theirs: Tensor, first_layer: int) -> None:
        """ours, theirs: (P, n, d_model) outputs of blocks first_layer .. first_layer + n - 1 at the prompts' last
        positions, as this adapter's `step` computed them (each from the forward's output of the block below) and
        as the model's own forward did. A mismatch means this adapter does not cover the model's configuration,
        and is an error. One host sync for all layers (on a GPU)."""
        tol = (1e-6 if self.dtype == torch.float64 else 1e-4) * (1.0 + theirs.abs().amax(dim=(0, 2)))  # (n,)
        err = (ours.detach() - theirs).abs().amax(dim=(0, 2))
        bad = (err > tol).nonzero()[:, 0].tolist()
        if bad:
            k = bad[0]
            raise RuntimeError(
                f"{type(self).__name__}: layer {first_layer + k} recomputed from the weights differs from the model's "
                f"forward by {err[k].item():.3g} (> {tol[k].item():.3g}); this model configuration is not supported "
                f"by the adapter"
            )
