"""Causal tracing (Meng et al. 2022, "ROME") and knockout (Geva et al. 2023; Endy et al. 2025 for Mamba's hidden
attention) for every supported architecture.

Causal tracing: run the prompt clean, and corrupted (Gaussian noise of standard deviation nu on the subject tokens'
input embeddings, `samples` seeded draws; or the subject swapped for another of the same token length). Then, in
the corrupted run, restore one state of the clean run and recompute everything after it; P is the probability of
the answer's first token at the last position (as ROME):

    residual[l, t]     = P with block l's output at position t restored
    kn_site[l, t]      = P with the knowledge-neuron projection's output (GPT-2 / GPT-NeoX MLP output, a
                         state-space model's mixer output) restored at t in the layers j of the window around l,
                         max(0, l - window // 2) <= j < min(L, l - window // 2 + window)
    token_mixing[l, t] = the same for the token-mixing output (a transformer's attention output; a state-space
                         model's scan output y before the gate, with the corrupted run's gate)

each a mean over the noise samples. nu defaults to 3 x the standard deviation of the subjects' token embeddings
(ROME's choice) over `subjects` (the fact set) when given, else over the traced subject.

Two ways of computing the same numbers: "reference", one hooked full forward of the real model per restoration
(the noise samples as its batch, as ROME's code); "fast", every restoration and noise sample a row of one batch
per restored position t. A restoration at t changes nothing before t in any layer, so a row runs only positions
t .. T - 1: it joins at the lowest layer it restores with its sample's corrupted block inputs there, and each block
above continues that sample's corrupted state before t at that layer (keys and values; conv window and SSM state:
`Adapter.position_states`, `Adapter.run_block`); rows that have restored the same layers so far run as one
branch; the last block runs the last position only, the LM head too (see `CausalTracer._fast`).

Knockout: P when the last position cannot read some positions (the subject's, the other non-last ones, or its
own) in the layers of a window around l: attention edges masked for transformers (scores -inf), and for
state-space models the blocked positions' terms alpha[T-1, s] x_s removed from the last position's scan output
(the hidden attention, exact: nothing blocked gives the clean run; the causal convolution before the scan is left
alone and still mixes the d_conv - 1 positions before the last into its input). Only the last position changes,
so the positions before it keep their clean block inputs and the last position is stepped through the layers
(`Adapter.knockout_output`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from common.errors import UserError
from common.tokens import encode, subject_positions
from models import Adapter, adapter_for, eval_mode

log = logging.getLogger(__name__)

SITES = ("residual", "kn_site", "token_mixing")
CORRUPTIONS = ("noise", "swap")
KNOCKOUTS = ("subject_to_last", "non_subject_to_last", "last_to_last")


@dataclass
class Trace:
    """Causal trace of one prompt. residual, kn_site, token_mixing: (n_layers, T) P after restoring (see the module
    docstring); tokens: the prompt's T tokens as text; subject: the subject's token positions."""

    p_clean: float
    p_corrupt: float
    residual: Tensor
    kn_site: Tensor
    token_mixing: Tensor
    tokens: list[str]
    subject: list[int]
    answer_token: int
    options: dict = field(default_factory=dict)


@dataclass
class _Corrupted:
    """The corrupted run of one prompt: its ids (T,) and the clean prompt's clean_ids, target token, subject
    positions, noise (rows, n_subject, d_model) added to the subject's input embeddings (None for a swap), and the
    clean run's site values clean[site][layer] (T, d_site)."""

    ids: Tensor
    clean_ids: Tensor
    target: int
    subject: list[int]
    noise: Tensor | None
    clean: dict[str, list[Tensor]]
    p_clean: float
    tokens: list[str]
    nu: float | None

    @property
    def samples(self) -> int:
        return 1 if self.noise is None else len(self.noise)


class CausalTracer:
    """Causal tracing and knockout of a causal LM of any supported architecture.

    >>> t = CausalTracer(model, tokenizer).trace("The Eiffel Tower is in", " Paris", "Eiffel Tower")
    >>> t.residual  # (n_layers, T)
    """

    def __init__(self, model, tokenizer, subjects: Sequence[str] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.adapter: Adapter = adapter_for(model)
        self.subjects = list(subjects) if subjects else None

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers

    def noise_level(self, subjects: Sequence[str]) -> float:
        """nu = 3 x the standard deviation of the input embeddings of the subjects' tokens (all entries; ROME)."""
        ids = [i for s in subjects for i in self.tokenizer(s, add_special_tokens=False)["input_ids"]]
        if not ids:
            raise UserError("no subject tokens to measure the embedding spread from")
        with torch.no_grad():
            emb = self.model.get_input_embeddings()(torch.tensor(ids, device=self.adapter.device))
        return 3.0 * emb.double().std().item()

    # --- causal tracing -----------------------------------------------------------------------------------------
    def trace(self, prompt: str, answer: str, subject: str, corruption: str = "noise", samples: int = 10,
              seed: int = 0, window: int = 10, noise: float | None = None, swap_subject: str | None = None,
              method: str = "fast", batch_size: int | None = None) -> Trace:
        """Causal trace of `answer`'s first token after `prompt`, corrupting `subject` (see the module docstring).

        method: "fast" (batched rows) or "reference" (one hooked forward per restoration).
        """
        if method not in ("fast", "reference"):
            raise UserError(f"unknown tracing method {method!r}: use 'fast' or 'reference'")
        if window < 1:
            raise UserError(f"window {window} must be >= 1")
        with eval_mode(self.model), torch.no_grad():
            run = self._corrupted(prompt, answer, subject, corruption, samples, seed, noise, swap_subject)
            p_corrupt = self._probabilities(run, torch.arange(run.samples), []).mean().item()
            maps = (self._fast(run, window, batch_size) if method == "fast" else
                    {site: self._reference(run, site, window) for site in SITES})
        options = {"corruption": corruption, "samples": run.samples, "seed": seed, "window": window, "noise": run.nu,
                   "swap_subject": swap_subject}
        return Trace(run.p_clean, p_corrupt, *(maps[s].cpu() for s in SITES), run.tokens, run.subject, run.target,
                     options)

    def _corrupted(self, prompt, answer, subject, corruption, samples, seed, noise, swap_subject,
                   record: bool = True) -> _Corrupted:
        """The corrupted run's inputs; record: also the clean run's site values (else only P clean)."""
        if corruption not in CORRUPTIONS:
            raise UserError(f"unknown corruption {corruption!r}: use {' or '.join(CORRUPTIONS)}")
        prompt_ids, answer_ids = encode(self.tokenizer, prompt, answer)
        positions = subject_positions(self.tokenizer, prompt, subject)
        if not positions:
            raise UserError(f"subject {subject!r} covers no token of prompt {prompt!r}")
        ad = self.adapter
        ids = torch.tensor(prompt_ids, device=ad.device)
        nu, eps = None, None
        if corruption == "noise":
            if samples < 1:
                raise UserError(f"samples {samples} must be >= 1")
            nu = float(noise) if noise is not None else self.noise_level(self.subjects or [subject])
            gen = torch.Generator().manual_seed(seed)
            d = self.model.get_input_embeddings().weight.shape[1]
            eps = (torch.randn(samples, len(positions), d, generator=gen, dtype=torch.float64) * nu).to(ad.device,
                                                                                                        ad.dtype)
            corrupt_ids = ids
        else:
            corrupt_ids = self._swapped(prompt, subject, swap_subject, prompt_ids, positions)
        clean, p_clean = self._record(ids, answer_ids[0], SITES if record else ())
        tokens = [self.tokenizer.decode([i]) for i in prompt_ids]
        return _Corrupted(corrupt_ids, ids, answer_ids[0], positions, eps, clean, p_clean, tokens, nu)

    def _swapped(self, prompt, subject, swap_subject, prompt_ids, positions) -> Tensor:
        """The prompt's ids with the subject replaced by `swap_subject`, which must take the same positions."""
        if not swap_subject:
            raise UserError("corruption 'swap' needs swap_subject")
        swapped = prompt.replace(subject, swap_subject, 1)
        new_ids = self.tokenizer(swapped, add_special_tokens=False)["input_ids"]
        new_positions = subject_positions(self.tokenizer, swapped, swap_subject)
        if len(new_ids) != len(prompt_ids) or new_positions != positions:
            raise UserError(f"swap subject {swap_subject!r} takes {len(new_positions)} tokens at {new_positions} "
                            f"of {len(new_ids)}, subject {subject!r} {len(positions)} at {positions} of "
                            f"{len(prompt_ids)}: they must take the same positions")
        return torch.tensor(new_ids, device=self.adapter.device)

    def _record(self, ids: Tensor, target: int, sites: Sequence[str]) -> tuple[dict[str, list[Tensor]], float]:
        """The clean run: the sites' values at every layer, clean[site][layer] (T, d_site), and P clean."""
        stores = {site: [[] for _ in range(self.n_layers)] for site in sites}
        handles = [h for site in sites for layer in range(self.n_layers)
                   for h in self.adapter.record_hooks(layer, site, stores[site][layer])]
        with _removing(handles):
            logits = self.model(ids[None], use_cache=False).logits[0, -1]
        clean = {site: [store[0][0] for store in stores[site]] for site in sites}
        return clean, logits.softmax(-1)[target].item()

    def _layers(self, site: str, layer: int, window: int) -> range:
        """The layers restored for a restoration centred at `layer`: the layer itself for the residual site."""
        if site == "residual":
            return range(layer, layer + 1)
        low = max(0, layer - window // 2)
        return range(low, min(self.n_layers, layer - window // 2 + window))

    def _probabilities(self, run: _Corrupted, sample: Tensor, restorations: list[tuple[int, str, Tensor, Tensor]],
                       last_only: bool = False) -> Tensor:
        """(rows,) P(target) of corrupted forwards, row r with noise sample sample[r] (rows,), and each restoration
        (layer, site, rows (n,), positions (n,)) putting the clean value of site at that layer back there.
        last_only: the LM head on the last position only (the plain forward computes every position's logits)."""
        ad = self.adapter
        handles: list[RemovableHandle] = []
        if run.noise is not None:
            handles.append(self.model.get_input_embeddings().register_forward_hook(
                _add_noise(run.noise[sample.to(run.noise.device)], run.subject)))
        for layer, site, rows, positions in restorations:
            rows, positions = rows.to(ad.device), positions.to(ad.device)
            handles += ad.restore_hooks(layer, site, rows, positions, run.clean[site][layer][positions])
        with _removing(handles):
            keep = {"logits_to_keep": 1} if last_only else {}
            logits = self.model(run.ids[None].expand(len(sample), -1), use_cache=False, **keep).logits[:, -1]
        return logits.softmax(-1)[:, run.target]

    def _reference(self, run: _Corrupted, site: str, window: int) -> Tensor:
        """(n_layers, T): one forward per restoration, the noise samples as its rows."""
        L, T, S = self.n_layers, len(run.ids), run.samples
        out = torch.empty(L, T, dtype=torch.float64)
        rows = torch.arange(S)
        for layer in range(L):
            for t in range(T):
                at = torch.full((S,), t)
                p = self._probabilities(run, rows, [(j, site, rows, at) for j in self._layers(site, layer, window)])
                out[layer, t] = p.double().mean().item()
        return out

    def _fast(self, run: _Corrupted, window: int, batch_size: int | None) -> dict[str, Tensor]:
        """site -> (n_layers, T): every restoration (site, layer, t) and noise sample a row that runs positions
        t .. T - 1 only.

        A restoration at position t changes nothing before t, in any layer: there every row is its noise sample's
        corrupted run. So a row joins at the lowest layer it restores with its sample's corrupted block inputs of
        positions t .. T - 1, and every block above continues its sample's corrupted state before t at that layer
        (`Adapter.position_states`, once per layer for all samples and positions; `Adapter.run_block`), the restore
        hooks acting on position t of its rows. Restoring block l's output at t is restoring block l + 1's input
        there, so a residual row joins at l + 1 with that input clean (the last block's: P clean at the last
        position, P corrupted before it). Rows that have restored the same layers so far are the same computation
        (windows clamped at layer 0) and run as one branch until they differ (`_Branches`). The last block runs
        the last position only (`Adapter.extend`; a restoration at t < T - 1 there changes only position t), the
        LM head too. Positions before the subject are the same in the clean and the corrupted run at every layer,
        so restoring them changes nothing: their rows are not run and get the corrupted runs' P (exactly). The rows
        of the three sites run together, `batch_size` rows of one position per staircase at most (None: all).
        """
        L, T, S = self.n_layers, len(run.ids), run.samples
        inputs, p_samples = self._corrupted_inputs(run)  # L x (S, T, d_model), (S,)
        dev = self.adapter.device
        grid = torch.arange(len(SITES) * L * S)  # the bookkeeping of rows and branches stays on the CPU
        site, layer, sample = grid // (L * S), grid // S % L, grid % S  # the rows of a position
        residual = site == SITES.index("residual")
        low = torch.where(residual, layer + 1, (layer - window // 2).clamp(min=0))  # where a row joins
        high = torch.where(residual, layer + 1, (layer - window // 2 + window).clamp(max=L))  # residual: no hook
        order = torch.argsort(low, stable=True)  # rows join in layer order
        order = order[low[order] < L]  # a residual row of the last block runs nothing
        chunk = batch_size or len(order)
        groups = [_Branches(t, order[i : i + chunk], site, low, high, sample)
                  for t in range(min(run.subject), T) for i in range(0, len(order), chunk)]
        for j in range(L):
            states = self.adapter.position_states(j, inputs[j])  # T x the S samples' states before t
            for g in groups:
                self._advance(run, g, j, inputs[j], states[g.t])
        probs = p_samples.repeat(len(SITES), L, T, 1)  # (sites, L, T, S)
        probs[SITES.index("residual"), L - 1, T - 1] = run.p_clean
        target = torch.full((1,), run.target, device=dev)
        for g in groups:
            p = self.adapter.answer_probability(g.h[:, -1], target.expand(len(g.h))).double().cpu()
            probs[site[g.rows], layer[g.rows], g.t, sample[g.rows]] = p[g.branch[g.rows]]
        return dict(zip(SITES, probs.mean(-1), strict=True))

    def _advance(self, run: _Corrupted, g: _Branches, j: int, x: Tensor, state) -> None:
        """The branches of g through block j: rows joining at j start from the corrupted block inputs x (S, T,
        d_model) at positions g.t.. (a residual row with the clean one at g.t), the others continue their branch;
        `state`: the S samples' states before g.t at layer j."""
        ad = self.adapter
        if not (g.low[g.rows] <= j).any():
            return
        rep, joining = g.branch_out(j)  # a row of each branch, (branches,); whether it starts here
        dev = x.device
        index = g.sample[rep].to(dev)  # each branch's noise sample: the prompt of `state` it continues
        h = x.new_empty(len(rep), x.shape[1] - g.t, x.shape[2])
        h[joining.to(dev)] = x[index[joining.to(dev)], g.t :]
        h[(joining & (g.site[rep] == SITES.index("residual"))).to(dev), 0] = run.clean["residual"][j - 1][g.t]
        if not joining.all():
            h[~joining.to(dev)] = g.h[g.previous[~joining].to(dev)]
        if j == self.n_layers - 1 and h.shape[1] > 1:
            # only the last position's output is read, and restoring g.t's in the last block changes only g.t's
            rows = torch.arange(len(h), device=dev)
            g.h = ad.step(j, h[:, -1], ad.extend(j, state, index, h[:, :-1]), rows)[:, None]
            return
        handles = []
        for k, site in enumerate(SITES):
            restored = torch.nonzero((g.site[rep] == k) & (g.low[rep] <= j) & (j < g.high[rep]))[:, 0].to(dev)
            if len(restored):
                handles += ad.restore_hooks(j, site, restored, torch.zeros_like(restored),
                                            run.clean[site][j][g.t].expand(len(restored), -1))
        with _removing(handles):
            g.h = ad.run_block(j, h, state, index)

    def _corrupted_inputs(self, run: _Corrupted) -> tuple[list[Tensor], Tensor]:
        """The block inputs of every layer in the corrupted runs, L x (samples, T, d_model), and their P (samples,)."""
        inputs: list[Tensor] = []

        def grab(module, args, kwargs):
            inputs.append((args[0] if args else kwargs["hidden_states"]).detach())

        handles = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in self.adapter.layers]
        with _removing(handles):
            p = self._probabilities(run, torch.arange(run.samples), [], last_only=True)
        return inputs, p.double().cpu()

    # --- restoring chosen neurons ------------------------------------------------------------------------------
    def restore_neurons(self, prompt: str, answer: str, subject: str, neuron_sets: Sequence[Sequence[tuple[int, int]]],
                        corruption: str = "noise", samples: int = 10, seed: int = 0, noise: float | None = None,
                        swap_subject: str | None = None) -> tuple[float, float, Tensor]:
        """(P clean, P corrupted, (n_sets,) P corrupted with only the neurons (layer, index) of a set restored to
        their clean activations at the last position), means over the noise samples; one batched forward of
        n_sets x samples rows."""
        with eval_mode(self.model), torch.no_grad():
            run = self._corrupted(prompt, answer, subject, corruption, samples, seed, noise, swap_subject, record=False)
            ad, S = self.adapter, run.samples
            clean = ad.prefix(run.clean_ids, states=False).acts[0]  # (n_layers, width) at the last position
            p_corrupt = self._probabilities(run, torch.arange(S), []).double().mean().item()
            masks = torch.zeros(len(neuron_sets), ad.n_layers, ad.width, dtype=torch.bool, device=ad.device)
            for k, neurons in enumerate(neuron_sets):
                for layer, index in neurons:
                    masks[k, layer, index] = True
            masks = masks.repeat_interleave(S, dim=0)  # (rows, n_layers, width): set k's rows k*S .. k*S + S - 1
            handles = [ad.neuron_module(layer).register_forward_pre_hook(_restore_last(masks[:, layer], clean[layer]))
                       for layer in range(ad.n_layers) if masks[:, layer].any()]
            with _removing(handles):
                p = self._probabilities(run, torch.arange(S).repeat(len(neuron_sets)), [], last_only=True)
        return run.p_clean, p_corrupt, p.double().view(len(neuron_sets), S).mean(-1).cpu()

    # --- knockout -------------------------------------------------------------------------------------------------
    def knockout(self, prompt: str, answer: str, subject: str, window: int = 9,
                 edges: str = "subject_to_last") -> Tensor:
        """(n_layers,) P(answer's first token) when the last position cannot read the positions of `edges` in the
        layers of the window around each layer l (as `kn_site`'s window): "subject_to_last" the subject's,
        "non_subject_to_last" the others before the last, "last_to_last" its own (for state-space models: its
        hidden-attention term alpha[T-1, T-1] x_{T-1}; the skip D x_{T-1} is kept)."""
        if edges not in KNOCKOUTS:
            raise UserError(f"unknown knockout {edges!r}: use one of {', '.join(KNOCKOUTS)}")
        if window < 1:
            raise UserError(f"window {window} must be >= 1")
        prompt_ids, answer_ids = encode(self.tokenizer, prompt, answer)
        positions = subject_positions(self.tokenizer, prompt, subject)
        T = len(prompt_ids)
        blocked = torch.zeros(T, dtype=torch.bool, device=self.adapter.device)
        if edges == "subject_to_last":
            blocked[[p for p in positions if p < T - 1]] = True
        elif edges == "non_subject_to_last":
            blocked[[p for p in range(T - 1) if p not in positions]] = True
        else:
            blocked[T - 1] = True
        with eval_mode(self.model), torch.no_grad():
            inputs, _, _ = self.adapter.block_io(torch.tensor(prompt_ids, device=self.adapter.device))
            out = [self.knocked_out(inputs, answer_ids[0], blocked, self._layers("window", layer, window))
                   for layer in range(self.n_layers)]
        return torch.tensor(out, dtype=torch.float64)

    def knocked_out(self, inputs: list[Tensor], target: int, blocked: Tensor, layers: range) -> float:
        """P(target) with the last position stepped through every block from the clean block inputs (T, d_model)
        of the positions before it, `blocked` (T,) masked in `layers`; nothing blocked: P clean."""
        ad = self.adapter
        none = torch.zeros_like(blocked)
        h = inputs[0][-1]
        for layer, x in enumerate(inputs):
            h = ad.knockout_output(layer, torch.cat([x[:-1], h[None]]), blocked if layer in layers else none)
        return ad.answer_probability(h[None], torch.tensor([target], device=ad.device)).item()


class _Branches:
    """Restoration rows of one position t, as the branches of a tree: rows that have restored the same layers so
    far (of one site, joined at the same layer, with the same sample, and not yet at different window ends) are
    one branch.

    rows: (R,) indices into site, low, high, sample (per row of every position: its site's index in SITES, its
    layers low <= j < high, where low is the layer it joins at and j the hooked ones, its noise sample);
    h: (branches, T - t, d_model) the branches' outputs of the last block run; branch: each row's branch in h
    (-1 before it joins).
    """

    def __init__(self, t: int, rows: Tensor, site: Tensor, low: Tensor, high: Tensor, sample: Tensor):
        self.t, self.rows, self.site, self.low, self.high, self.sample = t, rows, site, low, high, sample
        self.branch = torch.full_like(low, -1)
        self.previous: Tensor | None = None
        self.h: Tensor | None = None

    def branch_out(self, j: int) -> tuple[Tensor, Tensor]:
        """The branches at block j: (a row of each, whether it joins at j) (branches,) each; sets `branch` of the
        rows and `previous`, each branch's branch before j (valid where it does not join)."""
        rows = self.rows[self.low[self.rows] <= j]
        window_end = self.high[rows].clamp(max=j + 1)  # the restorations of layers <= j tell the branches apart
        n = len(self.low)
        key = ((self.site[rows] * n + self.low[rows]) * n + window_end) * n + self.sample[rows]
        _, inverse = torch.unique(key, return_inverse=True)
        rep = torch.empty(int(inverse.max()) + 1, dtype=torch.long).scatter_(0, inverse, rows)
        self.previous = self.branch[rep]
        self.branch[rows] = inverse
        return rep, self.low[rep] == j


def _restore_last(mask: Tensor, clean: Tensor):
    """A forward pre-hook setting the neurons of mask (rows, width) at the last position to clean (width,)."""

    def hook(module, args):
        x = args[0].clone()
        x[:, -1] = torch.where(mask, clean.to(x.dtype), x[:, -1])
        return (x, *args[1:])

    return hook


def _add_noise(noise: Tensor, positions: list[int]):
    """A forward hook adding noise (rows, n_subject, d_model) to the input embeddings at the subject positions."""

    def hook(module, args, output):
        output = output.clone()
        output[:, positions] += noise.to(output.dtype)
        return output

    return hook


@contextmanager
def _removing(handles: list[RemovableHandle]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()

