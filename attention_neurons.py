"""Where do knowledge neurons read from? Hidden attention of Mamba-family models (Mamba, Falcon-Mamba, Mamba-2),
token flow, and GPT-2's attention to the subject.

Hidden attention (Ali, Zimerman & Wolf 2024, "The Hidden Attention of Mamba Models", arXiv 2403.01590): with
the scan inputs of one layer in the common form of `models.ssm` (input x = u, step Delta per decay unit u, B and
C per group g, A, D; a unit is one channel of Mamba and Falcon-Mamba, one head of Mamba-2), the selective scan

    h_t = Abar_t h_{t-1} + Bbar_t x_t,   y_t = C_t h_t + D x_t,   Abar_t = exp(Delta_t A),  Bbar_t = Delta_t B_t

unrolls, channel c by channel, into a causal attention-like sum y_i[c] = sum_{j<=i} alpha_{i,j}[u] x_j[c] + D[u] x_i[c]
with u the unit of channel c, g the group of u and

    alpha_{i,j}[u] = sum_n C_i[g,n] exp(sum_{k=j+1..i} Delta_k[u] A[u,n]) Delta_j[u] B_j[g,n].

Mamba-2's A is one number per head, so its alpha is exp(sum Delta A) (C_i . B_j) Delta_j, shared by the head's
head_dim channels: (n_heads, T, T) against Mamba's (d_inner, T, T). The decay exponent is a segment sum (as
Mamba-2's `segsum`): each entry is summed from its own terms, never a difference of cumulative sums and never a
ratio of products, so long prompts with strong decay stay exact.

Token flow: the neurons of a layer (the input of `out_proj`) are a = y * g with g the adapter's
`neuron_factor`: silu(z) for Mamba; for Mamba-2 the gated RMSNorm's weight * silu(z) / rms(y * silu(z)), whose
rms is one number per position and channel group. With the clean g of the last position T-1, the activation of
channel c splits exactly over input tokens j:

    a_{T-1}[c] = sum_j alpha_{T-1,j}[u] x_j[c] g_{T-1}[c]  +  D[u] x_{T-1}[c] g_{T-1}[c]

(the skip term is credited to the last token). Shares of that sum go to the subject tokens, the last token and
the other tokens. GPT-2's real attention weights from the last position give the transformer side.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from common.errors import UserError
from common.tokens import encode, subject_positions
from facts import Fact
from knowledge_neurons import Neuron
from models import SSMAdapter, SSMInputs, adapter_for

log = logging.getLogger(__name__)

GROUPS = ("subject", "last", "other")
CHUNK = 256  # decay units per hidden-attention chunk: memory chunk * T^2 * d_state


# ----------------------------------------------------------------------------------------------------------
# hidden attention


def _mamba(model: nn.Module) -> SSMAdapter:
    """The adapter of a Mamba-family (state-space) model; any other model is a user error."""
    adapter = adapter_for(model)
    if not isinstance(adapter, SSMAdapter):
        kind = model.config.model_type
        raise UserError(f"hidden attention is defined for Mamba-family models only, not for a '{kind}' model")
    return adapter


def _token_ids(input_ids: Tensor | Sequence[int]) -> Tensor:
    """One prompt's token ids (T,) from (T,) or (1, T), as a tokenizer returns them."""
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2 and len(ids) == 1:
        ids = ids[0]
    if ids.dim() != 1 or not len(ids):
        raise UserError(f"input_ids must be one prompt of shape (T,) or (1, T), T >= 1; got {tuple(ids.shape)}")
    return ids


def _ssm_inputs(adapter: SSMAdapter, input_ids: Tensor, layers: Sequence[int]) -> list[SSMInputs]:
    """The scan inputs of some layers for a prompt (T,) or (1, T), from one forward pass of the real model."""
    bad = [layer for layer in layers if not 0 <= layer < adapter.n_layers]
    if bad:
        raise UserError(f"layers {bad} do not exist: the model has layers 0..{adapter.n_layers - 1}")
    inputs, _, _ = adapter.block_io(_token_ids(input_ids))
    return [adapter.ssm_inputs(layer, inputs[layer]) for layer in layers]


def segsum(x: Tensor) -> Tensor:
    """x (..., T) -> (..., T, T): out[..., i, j] = x_{j+1} + ... + x_i for i >= j (0 on the diagonal), -inf above."""
    T = x.shape[-1]
    below = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)  # k > j
    terms = x[..., :, None].expand(*x.shape, T).masked_fill(~below, 0.0)  # terms[..., k, j] = x_k if k > j
    sums = terms.cumsum(dim=-2)  # sums[..., i, j] = sum_{j < k <= i} x_k
    return sums.masked_fill_(below.T, -torch.inf)


def per_channel(s: SSMInputs, values: Tensor) -> Tensor:
    """(H, ...) values of the decay units -> (d_inner, ...) the value of each channel's unit."""
    return values.repeat_interleave(s.u.shape[1] // s.dt.shape[1], dim=0)


def _alpha(s: SSMInputs, units: slice | Tensor) -> Tensor:
    """Hidden attention of some decay units: (c, T, T), zero above the diagonal."""
    dt = s.dt[:, units]  # (T, c)
    decay = segsum((dt[..., None] * s.A[units]).permute(1, 2, 0)).exp_()  # (c, d_state or 1, T, T)
    CB = torch.einsum("ign,jgn->gnij", s.C, s.B)  # (G, d_state, T, T) C_i[n] B_j[n] of each group
    if decay.shape[1] == 1:  # one decay for all state entries (Mamba-2): contract the state first
        CB = CB.sum(1, keepdim=True)
    return (decay * CB[s.group(units)]).sum(1) * dt.T[:, None, :]


def hidden_attention(model: nn.Module, input_ids: Tensor, layer: int, chunk: int = CHUNK) -> Tensor:
    """Hidden attention alpha of one layer of a Mamba-family model for a prompt, input_ids (T,) or (1, T).

    Returns (units, T, T): (d_inner, T, T) for Mamba and Falcon-Mamba, (n_heads, T, T) for Mamba-2.
    alpha[u, i, j] weighs the SSM input x_j[c] in the output y_i[c] of every channel c of unit u (zero for
    j > i); computed `chunk` units at a time from the layer's own parameters.
    """
    adapter = _mamba(model)
    with torch.no_grad():
        (s,) = _ssm_inputs(adapter, input_ids, [layer])
        return _alpha_all(s, chunk)


def _alpha_all(s: SSMInputs, chunk: int = CHUNK) -> Tensor:
    """(units, T, T) hidden attention of every decay unit, `chunk` units at a time."""
    return torch.cat([_alpha(s, slice(c, c + chunk)) for c in range(0, s.dt.shape[1], chunk)])


def mean_abs_hidden_attention(model: nn.Module, input_ids: Tensor, layers: Sequence[int]) -> Tensor:
    """Channel-averaged |alpha| of some layers for a prompt (T,), from one forward pass: (len(layers), T, T).

    |alpha| because alpha's sign varies between channels and would cancel in a signed mean.
    """
    with torch.no_grad():
        ssm = _ssm_inputs(_mamba(model), input_ids, layers)
        return torch.stack([_alpha_all(s).abs().mean(0) for s in ssm])


# ----------------------------------------------------------------------------------------------------------
# token flow into knowledge neurons


def _flow(adapter: SSMAdapter, layer: int, s: SSMInputs, alpha_last: Tensor) -> Tensor:
    """(d_inner, T) contributions of each input token to every neuron's activation at the last position.

    alpha_last: (units, T) the last row of the layer's hidden attention (`SSMInputs.alpha_last`).
    """
    split = per_channel(s, alpha_last) * s.u.T  # (d_inner, T) alpha_{T-1,j} x_j: the SSM output y_{T-1} split
    split[:, -1] += per_channel(s, s.D) * s.u[-1]  # skip connection D x_{T-1}
    factor = adapter.neuron_factor(layer, split.sum(1)[None], s.z[-1:])[0]  # (d_inner,) of the clean y_{T-1}
    return split * factor[:, None]


def token_flow(model: nn.Module, input_ids: Tensor, layer: int, neurons: Sequence[int]) -> Tensor:
    """Exact split of the activations of `neurons` of `layer` at the last position over the input tokens.

    input_ids: (T,) or (1, T). Returns (len(neurons), T); row r sums to the activation (the `out_proj` input) of
    neuron neurons[r].
    """
    adapter = _mamba(model)
    bad = [i for i in neurons if not 0 <= i < adapter.width]
    if bad:
        raise UserError(f"neuron indices {bad} are outside 0..{adapter.width - 1}")
    with torch.no_grad():
        (s,) = _ssm_inputs(adapter, input_ids, [layer])
        return _flow(adapter, layer, s, s.alpha_last(slice(None)))[list(neurons)]


def _group_masks(T: int, subject_pos: Sequence[int]) -> Tensor:
    """(3, T) 0/1 masks of the subject tokens (without the last position), the last token, the other tokens."""
    if any(not 0 <= p < T for p in subject_pos):
        raise ValueError(f"subject positions {list(subject_pos)} fall outside a prompt of {T} tokens")
    subject = torch.zeros(T, dtype=torch.bool)
    subject[[p for p in subject_pos if p < T - 1]] = True
    last = torch.zeros(T, dtype=torch.bool)
    last[-1] = True
    return torch.stack([subject, last, ~(subject | last)]).double()


def _floats(values: Tensor) -> list[float | None]:
    """JSON-ready floats; NaN and infinities become None."""
    return [float(v) if np.isfinite(v) else None for v in values.double().tolist()]


def _shares(values: Tensor, subject_pos: Sequence[int]) -> Tensor:
    """(n, T) -> (n, 3) sums over subject / last / other tokens divided by the row sums."""
    values = values.detach().double().cpu()
    return values @ _group_masks(values.shape[-1], subject_pos).T / values.sum(-1, keepdim=True)


def flow_shares(contrib: Tensor, subject_pos: Sequence[int]) -> dict:
    """Per-neuron shares of the activation from subject tokens, the last token and the other tokens.

    contrib: (n, T) from `token_flow`. A subject token at the last position counts as "last".
    "signed": group sum / activation (sums to 1, a share may be negative or above 1 when contributions cancel);
    "absolute": group sum of |contribution| / sum of |contribution| (in [0, 1], sums to 1).
    Each share is a list of n floats (None where the denominator is 0).
    """
    signed, absolute = _shares(contrib, subject_pos), _shares(contrib.abs(), subject_pos)
    return {
        "signed": {g: _floats(signed[:, k]) for k, g in enumerate(GROUPS)},
        "absolute": {g: _floats(absolute[:, k]) for k, g in enumerate(GROUPS)},
    }


# ----------------------------------------------------------------------------------------------------------
# GPT-2: real attention from the answer position


def _table(masses: Tensor) -> dict:
    """(n, 3) -> {"subject": [n floats], "last": [...], "other": [...]}."""
    return {g: _floats(masses[:, k]) for k, g in enumerate(GROUPS)}


def subject_mixing(model: nn.Module, tokenizer, facts: Sequence[Fact]) -> dict:
    """How much the last prompt token (the answer position) reads from subject / last / other tokens, per layer.

    For every architecture through `Adapter.token_mixing`: a transformer's attention weights (heads averaged),
    a state-space model's hidden attention (mean |alpha| over units, normalised). "mean" averages over all
    prompts of all facts, "facts" over each fact's prompts.
    """
    adapter = adapter_for(model)
    if not facts:
        raise UserError("subject mixing needs at least one fact")
    per_fact: dict[str, Tensor] = {}
    with torch.no_grad():
        for fact in facts:
            masses = []
            for prompt in fact.prompts:
                ids, _ = encode(tokenizer, prompt, fact.answer, fact.id)
                weights = adapter.token_mixing(torch.tensor(ids))  # (n_layers, T)
                masses.append(_shares(weights, subject_positions(tokenizer, prompt, fact.subject)))  # (n_layers, 3)
            per_fact[fact.id] = torch.stack(masses)  # (prompts, n_layers, 3)
    every = torch.cat(list(per_fact.values()))
    log.info("subject mixing (%s): %d facts, %d prompts", adapter.token_mixing_kind, len(per_fact), len(every))
    return {
        "kind": adapter.token_mixing_kind,
        "n_layers": adapter.n_layers,
        "n_prompts": len(every),
        "mean": _table(every.mean(0)),
        "facts": {fact_id: _table(m.mean(0)) for fact_id, m in per_fact.items()},
    }


# ----------------------------------------------------------------------------------------------------------
# Mamba: hidden attention and token flow for every fact, prompt and refined neuron

METHOD = {
    "position": "last prompt token, the position that predicts the answer's first token",
    "subject_tokens": "prompt tokens overlapping the subject's characters, without the last position",
    "hidden_attention": "mean over channels of |alpha_{T-1,j}| normalized to sum 1 over tokens j (alpha's sign "
    "varies between channels and would cancel in a signed mean; a Mamba-2 head's alpha stands for each of its "
    "channels); the D skip term is not attention and is left out",
    "skip_term": "the D x_{T-1} skip term of the scan counts as a contribution of the last token",
    "signed_share": "sum of a group's contributions / activation; sums to 1, can leave [0, 1] when tokens cancel",
    "absolute_share": "sum of a group's |contributions| / sum of all |contributions|; in [0, 1], sums to 1",
    "aggregation": "plain means over (prompt, neuron) pairs; undefined (null) shares are skipped",
}


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _mean_shares(records: Iterable[dict]) -> dict:
    """Mean signed and absolute shares over neuron records (see `_prompt_analysis`)."""
    records = list(records)
    means = {kind: {g: _mean(r[kind][g] for r in records) for g in GROUPS} for kind in ("signed", "absolute")}
    return {"n": len(records), **means}


def _check_neurons(adapter: SSMAdapter, fact_id: str, neurons: Sequence[Neuron]) -> None:
    bad = [(lay, i) for lay, i, _ in neurons if not (0 <= lay < adapter.n_layers and 0 <= i < adapter.width)]
    if bad:
        raise UserError(
            f"{fact_id}: neurons {bad} do not exist in a model of {adapter.n_layers} layers x {adapter.width} neurons"
        )


def _prompt_analysis(adapter: SSMAdapter, tokenizer, fact: Fact, prompt: str, neurons: Sequence[Neuron]) -> dict:
    """Per layer hidden-attention masses of the last position, and the token flow of the fact's neurons."""
    ids, _ = encode(tokenizer, prompt, fact.answer, fact.id)
    subject = subject_positions(tokenizer, prompt, fact.subject)
    inputs, _, _ = adapter.block_io(torch.tensor(ids))
    masses, records = [], []
    for layer, x in enumerate(inputs):
        s = adapter.ssm_inputs(layer, x)
        alpha_last = s.alpha_last(slice(None))  # (units, T)
        masses.append(_shares(alpha_last.abs().mean(0)[None], subject)[0])  # channel-averaged |alpha_{T-1, j}|
        mine = [(int(i), float(score)) for lay, i, score in neurons if lay == layer]
        if not mine:
            continue
        contrib = _flow(adapter, layer, s, alpha_last)[[i for i, _ in mine]]  # (n, T)
        shares = flow_shares(contrib, subject)
        for r, (index, score) in enumerate(mine):
            records.append(
                {
                    "layer": layer,
                    "index": index,
                    "score": score,
                    "activation": float(contrib[r].sum()),
                    "contributions": _floats(contrib[r]),
                    **{kind: {g: shares[kind][g][r] for g in GROUPS} for kind in ("signed", "absolute")},
                }
            )
    return {
        "prompt": prompt,
        "token_ids": ids,
        "tokens": tokenizer.convert_ids_to_tokens(ids),
        "subject_positions": subject,
        "hidden_attention": [dict(zip(GROUPS, _floats(m), strict=True)) for m in masses],
        "neurons": records,
    }


def mamba_attention_analysis(
    model: nn.Module,
    tokenizer,
    facts: Sequence[Fact],
    refined: Mapping[str, Sequence[Neuron]],
    progress: bool = True,
    label: str = "Mamba",
) -> dict:
    """Hidden attention and knowledge-neuron token flow of a Mamba-family model over facts (JSON-ready, no NaN).

    refined: fact id -> refined neurons (layer, index, score); a fact without an entry has no neurons.
    Per prompt: the tokens, the subject positions, per layer the subject / last / other mass of the channel-averaged
    hidden attention of the last position, and for each neuron its contributions and shares (see `METHOD`).
    Aggregated: mean flow shares per fact, per relation, per layer and overall. `label` names the model in the
    progress bar.
    """
    adapter = _mamba(model)
    out = []
    with torch.no_grad():
        for fact in tqdm(facts, desc=f"hidden attention {label}", unit="fact", disable=not progress):
            neurons = list(refined.get(fact.id, ()))
            _check_neurons(adapter, fact.id, neurons)
            prompts = [_prompt_analysis(adapter, tokenizer, fact, p, neurons) for p in fact.prompts]
            out.append(
                {
                    "id": fact.id,
                    "relation": fact.relation,
                    "subject": fact.subject,
                    "answer": fact.answer,
                    "n_neurons": len(neurons),
                    "prompts": prompts,
                    "flow": _mean_shares(r for p in prompts for r in p["neurons"]),
                }
            )
    records = [(f["relation"], r) for f in out for p in f["prompts"] for r in p["neurons"]]
    hidden = [p["hidden_attention"] for f in out for p in f["prompts"]]  # (prompts, n_layers) of group masses
    log.info("hidden attention: %d facts, %d prompts, %d neuron-prompt pairs", len(out), len(hidden), len(records))
    return {
        "method": METHOD,
        "n_layers": adapter.n_layers,
        "width": adapter.width,
        "facts": out,
        "by_relation": {
            rel: _mean_shares(r for rr, r in records if rr == rel) for rel in dict.fromkeys(f["relation"] for f in out)
        },
        "by_layer": [
            {
                "layer": layer,
                "flow": _mean_shares(r for _, r in records if r["layer"] == layer),
                "hidden_attention": {g: _mean(h[layer][g] for h in hidden) for g in GROUPS},
            }
            for layer in range(adapter.n_layers)
        ],
        "overall": _mean_shares(r for _, r in records),
    }
