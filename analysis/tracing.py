"""The causal-tracing stage of one model: trace and knock out every fact, cross-check its knowledge neurons, and
summarise (ROME's six token groups, knockout as relative change, knowledge neurons vs random neurons).

Per fact its first prompt is traced. Average indirect effect (AIE) of a site at (layer, group) = mean over facts of
the mean over the group's positions of P_restored - P_corrupt. The six groups (Meng et al. 2022, Fig. 2): first,
middle (mean over the subject tokens between first and last; none for subjects of one or two tokens), last subject
token, first token after the subject, further tokens (between it and the last token), last token. A group a fact
does not have (a one-token subject has the same first and last token; a prompt may end right after the subject)
takes no part in that group's mean.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from analysis.cache import FactFiles
from analysis.interventions import random_controls
from analysis.significance import bootstrap_mean
from causal_tracing import KNOCKOUTS, SITES, CausalTracer
from common.errors import UserError
from common.sampling import seeded_rng
from facts import Fact
from knowledge_neurons import Neuron

log = logging.getLogger(__name__)

GROUPS = ("first_subject", "middle_subject", "last_subject", "first_after", "further", "last")


@dataclass
class TraceOptions:
    corruption: str = "noise"
    noise: float | None = None  # nu; None = 3 x the std of the subjects' token embeddings over the facts
    samples: int = 10
    window: int = 10
    knockout_window: int = 9
    seed: int = 0
    random_draws: int = 5
    bootstrap: int = 1000


def token_groups(T: int, subject: Sequence[int]) -> dict[str, list[int]]:
    """ROME's six token groups of a prompt of T tokens whose subject takes positions `subject` (see the module
    docstring); a group can be empty."""
    first, last = min(subject), max(subject)
    after = [p for p in range(last + 1, T - 1)]
    return {
        "first_subject": [first],
        "middle_subject": [p for p in subject if first < p < last],
        "last_subject": [last] if last != first else [],
        "first_after": after[:1],
        "further": after[1:],
        "last": [T - 1],
    }


def swap_subject(tracer: CausalTracer, fact: Fact, facts: Sequence[Fact]) -> str:
    """Another subject of the fact's relation that takes the same token positions in the fact's first prompt."""
    from common.tokens import subject_positions

    prompt = fact.prompts[0]
    want = (len(tracer.tokenizer(prompt, add_special_tokens=False)["input_ids"]),
            subject_positions(tracer.tokenizer, prompt, fact.subject))
    for other in facts:
        if other.relation != fact.relation or other.subject == fact.subject:
            continue
        swapped = prompt.replace(fact.subject, other.subject, 1)
        got = (len(tracer.tokenizer(swapped, add_special_tokens=False)["input_ids"]),
               subject_positions(tracer.tokenizer, swapped, other.subject))
        if got == want:
            return other.subject
    raise UserError(f"fact {fact.id}: no other subject of relation {fact.relation} has as many tokens as "
                    f"{fact.subject!r} in {prompt!r}; use --corruption noise")


def trace_fact(tracer: CausalTracer, fact: Fact, options: TraceOptions, nu: float | None, swap: str | None,
               kn: Sequence[tuple[int, int]]) -> dict:
    """Trace, knockout and knowledge-neuron cross-check (its refined neurons kn, (layer, index) each) of one
    fact's first prompt (JSON-ready); swap: the swap subject (corruption "swap"). The random neurons of the
    cross-check are the fact's own seeded draws (`seeded_rng`), so its numbers do not depend on the other facts."""
    prompt = fact.prompts[0]
    t = tracer.trace(prompt, fact.answer, fact.subject, options.corruption, options.samples, options.seed,
                     options.window, nu, swap)
    knockout = {kind: tracer.knockout(prompt, fact.answer, fact.subject, options.knockout_window, kind).tolist()
                for kind in KNOCKOUTS}
    record = {"id": fact.id, "relation": fact.relation, "prompt": prompt, "answer": fact.answer,
              "subject": fact.subject, "swap_subject": swap, "tokens": t.tokens, "subject_positions": t.subject,
              "p_clean": t.p_clean, "p_corrupt": t.p_corrupt,
              **{site: getattr(t, site).tolist() for site in SITES}, "knockout": knockout, "kn_cross_check": None}
    if kn and options.corruption == "noise":
        rng = seeded_rng(options.seed, f"causal trace controls {fact.id}")
        controls = random_controls(kn, tracer.adapter.width, options.random_draws, rng)
        _, p_corrupt, p = tracer.restore_neurons(prompt, fact.answer, fact.subject, [kn, *controls], "noise",
                                                 options.samples, options.seed, nu)
        record["kn_cross_check"] = {"n_neurons": len(kn), "p_corrupt": p_corrupt,
                                    "restore_kn": p[0].item() - p_corrupt,
                                    "restore_random": p[1:].mean().item() - p_corrupt,
                                    "restore_random_draws": (p[1:] - p_corrupt).tolist()}
    return record


class TraceCache(FactFiles):
    """Finished facts of the causal-tracing stage of one model, one JSON record each (`trace_fact`), under
    <folder>/<model>-trace-<key>: the key holds every trace option a fact's numbers depend on (all but
    `bootstrap`, which only the summary uses) with the noise level nu actually used (the default is measured
    over the fact set); each fact's file also names its swap subject and its refined neurons."""

    suffix = ".json"

    def __init__(self, folder: Path, model_name: str, model, options: TraceOptions, nu: float | None):
        key = {k: v for k, v in asdict(options).items() if k != "bootstrap"} | {"noise": nu}
        super().__init__(folder, model_name, model, key, kind="trace")

    def load(self, fact: Fact, extra: dict) -> dict | None:
        """The cached record of `fact`, or None (none, or a damaged file: see `FactFiles._read`)."""

        def parse(data: bytes) -> dict:
            record = json.loads(data)
            if record["id"] != fact.id or record["prompt"] != fact.prompts[0]:
                raise ValueError(f"holds fact {record['id']!r}, prompt {record['prompt']!r}")
            return record

        return self._read(fact, parse, extra)

    def save(self, fact: Fact, record: dict, extra: dict) -> None:
        self._write(fact, json.dumps(record).encode(), extra)


def _group_means(values: np.ndarray, p_corrupt: float, groups: dict[str, list[int]]) -> np.ndarray:
    """(n_layers, T) P restored -> (n_layers, 6) mean indirect effect of each group, NaN where a group is empty."""
    out = np.full((values.shape[0], len(GROUPS)), np.nan)
    for g, name in enumerate(GROUPS):
        if groups[name]:
            out[:, g] = values[:, groups[name]].mean(1) - p_corrupt
    return out


def _nanmean(stack: np.ndarray) -> np.ndarray:
    """Mean over axis 0 ignoring NaN; NaN (JSON null) where every value is NaN."""
    count = (~np.isnan(stack)).sum(0)
    return np.where(count > 0, np.nansum(stack, 0) / np.maximum(count, 1), np.nan)


def summarise(records: Sequence[dict], n_layers: int, refined: Mapping[str, Sequence[Neuron]],
              options: TraceOptions) -> dict:
    """The `summary` of <label>_causal_trace.json (see docs/causal_tracing.md)."""
    groups = [token_groups(len(r["tokens"]), r["subject_positions"]) for r in records]
    aie = {site: _nanmean(np.stack([_group_means(np.asarray(r[site]), r["p_corrupt"], g)
                                    for r, g in zip(records, groups, strict=True)])).tolist() for site in SITES}
    knockout = {kind: _nanmean(np.stack([(np.asarray(r["knockout"][kind]) - r["p_clean"]) / r["p_clean"]
                                         if r["p_clean"] > 0 else np.full(n_layers, np.nan) for r in records])).tolist()
                for kind in KNOCKOUTS}
    checked = [r["kn_cross_check"] for r in records if r["kn_cross_check"] is not None]
    per_layer = np.zeros(n_layers)
    for neurons in refined.values():
        for layer, _, _ in neurons:
            per_layer[layer] += 1
    last_subject = np.asarray(aie["kn_site"])[:, GROUPS.index("last_subject")]
    first_subject = np.asarray(aie["kn_site"])[:, GROUPS.index("first_subject")]
    last_subject = np.where(np.isnan(last_subject), first_subject, last_subject)  # one-token subjects
    last = np.asarray(aie["kn_site"])[:, GROUPS.index("last")]
    cross = {
        "facts": len(checked),
        "restore_kn": bootstrap_mean([c["restore_kn"] for c in checked], options.bootstrap, options.seed),
        "restore_random": bootstrap_mean([c["restore_random"] for c in checked], options.bootstrap, options.seed),
        "kn_layer_distribution": (per_layer / per_layer.sum()).tolist() if per_layer.sum() else None,
        "layer_correlation": {"last_subject_token": _pearson(per_layer, last_subject),
                              "last_token": _pearson(per_layer, last)},
    }
    for key in ("restore_kn", "restore_random"):  # the issue's {"mean", "ci"} beside the bootstrap's fields
        cross[key]["ci"] = [cross[key]["low"], cross[key]["high"]]
    return {
        "facts": len(records),
        "groups": list(GROUPS),
        "p_clean": {"mean": float(np.mean([r["p_clean"] for r in records]))},
        "p_corrupt": {"mean": float(np.mean([r["p_corrupt"] for r in records]))},
        "aie": aie,
        "knockout": knockout,
        "kn_cross_check": cross,
    }


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson r over layers; None when either side is constant or has a missing value."""
    if np.isnan(y).any() or np.std(x) == 0 or np.std(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def trace_model(model, tokenizer, facts: Sequence[Fact], refined: Mapping[str, Sequence[Neuron]],
                options: TraceOptions, progress: bool = True, label: str = "",
                traced: Sequence[Fact] | None = None, cache_dir: Path | None = None, resume: bool = True,
                model_name: str = "") -> dict:
    """The facts `traced` (default: all) of one model -> {"options", "facts": [per fact], "summary"} (JSON-ready);
    nu and the swap subjects come from all `facts`. Finished facts are saved to `cache_dir` (when given;
    `TraceCache`, the folder named by `model_name` or `label`) and, with `resume`, taken from there instead of
    being traced again."""
    tracer = CausalTracer(model, tokenizer)
    nu = None
    if options.corruption == "noise":
        nu = options.noise if options.noise is not None else tracer.noise_level([f.subject for f in facts])
    cache = TraceCache(cache_dir, model_name or label, model, options, nu) if cache_dir else None
    torch.manual_seed(options.seed)
    traced = list(facts if traced is None else traced)
    records, reused = [], 0
    for fact in tqdm(traced, desc=f"causal trace {label}".strip(), unit="fact", disable=not progress):
        swap = swap_subject(tracer, fact, facts) if options.corruption == "swap" else None
        kn = [(layer, i) for layer, i, _ in refined.get(fact.id, ())]
        extra = {"swap_subject": swap, "neurons": kn}
        record = cache.load(fact, extra) if cache and resume else None
        reused += record is not None
        if record is None:
            record = trace_fact(tracer, fact, options, nu, swap, kn)
            if cache:
                cache.save(fact, record, extra)
        records.append(record)
    if reused:
        log.info("%s: reused %d of %d traced facts from %s", label, reused, len(traced), cache.folder)
    return {"options": {**asdict(options), "noise": nu, "noise_rule": "given" if options.noise is not None else
                        "3 x std of the subjects' token embeddings over the facts (ROME)"},
            "n_layers": tracer.n_layers,
            "sites": {"residual": "block output", "kn_site": f"output of the module whose input is the neurons: "
                      f"{tracer.adapter.neuron_site}", "token_mixing": tracer.adapter.mixing_site},
            "facts": records, "summary": summarise(records, tracer.n_layers, refined, options)}
