"""The knowledge-neuron stage for one model: attribution of every fact prompt, coarse and refined neurons,
overlap statistics, and the files that hold them. Finished facts are cached so an interrupted run resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from analysis.cache import FactFiles
from analysis.overlap import neurons_per_layer, overlap_statistics
from analysis.scores import SAVE_SCORES, ScoreWriter
from common.errors import UserError
from common.outputs import table, versions, write_json
from common.tokens import continuation
from facts import Fact
from knowledge_neurons import IG_METHODS, KnowledgeNeurons, Neuron, coarse_neurons, refined_neurons

log = logging.getLogger(__name__)

BASELINES = ("zero", "mean", "reference")
TABLE_MAX_FACTS = 50  # above this many facts the console table has one row a relation
FROM_FACTS = "from facts"  # find_knowledge_neurons' default baseline: computed from the facts it is given


@dataclass(frozen=True)
class Options:
    """Every option that shapes a knowledge-neuron result; stored in each output file."""

    steps: int = 20
    ig_method: str = "riemann_left"
    threshold: float = 0.2  # coarse: score >= threshold * max score of the prompt (all layers)
    share: float = 0.5  # refined: in >= share of a fact's prompts (and in >= 2 of them)
    batch_size: int | None = None  # (layer, alpha) rows per pass; None = all at once
    prompts_per_batch: int | None = None  # prompts of several facts per staircase; None = by device (see below)
    baseline: str = "zero"  # IG baseline: zero (Dai et al.), mean activation over the fact prompts, reference prompt
    baseline_prompt: str | None = None
    seed: int = 0
    save_scores: str = "prompt"  # what the score file keeps (analysis.scores.SAVE_SCORES); not part of the scores

    def __post_init__(self):
        if self.ig_method not in IG_METHODS:
            raise UserError(f"--ig-method {self.ig_method}: choose from {', '.join(IG_METHODS)}")
        if self.baseline not in BASELINES:
            raise UserError(f"--baseline {self.baseline}: choose from {', '.join(BASELINES)}")
        if self.save_scores not in SAVE_SCORES:
            raise UserError(f"--save-scores {self.save_scores}: choose from {', '.join(SAVE_SCORES)}")
        if self.baseline == "reference" and not self.baseline_prompt:
            raise UserError("--baseline reference needs --baseline-prompt TEXT (the reference prompt)")
        if self.baseline != "reference" and self.baseline_prompt is not None:
            raise UserError(f"--baseline-prompt is used only with --baseline reference (the baseline is "
                            f"'{self.baseline}'); add --baseline reference or drop --baseline-prompt")
        if not 0 < self.threshold <= 1 or not 0 < self.share <= 1:
            raise UserError("--threshold and --share must lie in (0, 1]")
        if self.steps < 1 or any(n is not None and n < 1 for n in (self.batch_size, self.prompts_per_batch)):
            raise UserError("--steps, --batch-size and --prompts-per-batch must be positive")

    def scores_key(self) -> dict:
        """The options the score tensors depend on (the thresholds are applied afterwards)."""
        return {k: getattr(self, k) for k in ("steps", "ig_method", "baseline", "baseline_prompt")}


@dataclass
class FactResult:
    """Attribution of every prompt of one fact, and what the later stages need of its scores (`of` computes it).

    scores: (n_prompts, n_layers, width), or None once they went to a score file (the pipeline's results hold no
    score tensors: analysis.scores); delta: (n_prompts, n_layers) completeness deltas; probs: per prompt,
    (n_answer_tokens,) clean P(answer token k | prompt + answer[:k]); refined: the refined neurons (the options'
    threshold and share); refined_first_half: those of the first ceil(n_prompts / 2) prompts alone (editing
    measures them on the others); n_coarse: coarse neurons per prompt; score_sums: (n_prompts, n_layers) float64
    sum of each layer's scores (the completeness check).
    """

    fact: Fact
    scores: Tensor | None
    delta: Tensor
    probs: list[Tensor]
    prompt_ids: list[list[int]]
    answer_ids: list[int]
    refined: list[Neuron]
    refined_first_half: list[Neuron]
    n_coarse: list[int]
    score_sums: Tensor

    @classmethod
    def of(cls, fact: Fact, scores: Tensor, delta: Tensor, probs: list[Tensor], prompt_ids: list[list[int]],
           answer_ids: list[int], options: Options) -> FactResult:
        """The result of scores (n_prompts, n_layers, width) and the rest, thresholded with `options`."""
        prompts, o = list(scores), options
        return cls(fact, scores, delta, probs, prompt_ids, answer_ids,
                   refined_neurons(prompts, o.threshold, o.share),
                   refined_neurons(prompts[: (len(prompts) + 1) // 2], o.threshold, o.share),
                   [len(coarse_neurons(s, o.threshold)) for s in prompts], scores.double().sum(-1))


@dataclass
class ModelResult:
    name: str
    architecture: str
    neuron_site: str  # which module's input the neurons are (from the adapter)
    n_layers: int
    width: int
    options: Options
    facts: list[FactResult]

    @cached_property
    def refined(self) -> dict[str, list[Neuron]]:
        """Fact id -> refined neurons (layer, index, mean score): each FactResult.refined (the result's options)."""
        return {r.fact.id: r.refined for r in self.facts}

    def neuron_sets(self) -> dict[str, frozenset[tuple[int, int]]]:
        return {fid: frozenset((lay, i) for lay, i, _ in ns) for fid, ns in self.refined.items()}

    def relations(self) -> dict[str, str]:
        return {r.fact.id: r.fact.relation for r in self.facts}

    @cached_property
    def overlap(self) -> dict:
        """Intra- vs inter-relation overlap of the refined neuron sets (see `statistics_kn.overlap_statistics`)."""
        return overlap_statistics(self.neuron_sets(), self.relations(), self.n_layers)

    @cached_property
    def layer_distribution(self) -> list[int]:
        """Knowledge neurons per layer, summed over facts."""
        return neurons_per_layer(self.neuron_sets(), self.n_layers)


def baseline_activations(kn: KnowledgeNeurons, facts: Sequence[Fact], options: Options,
                         progress: bool = False) -> Tensor | None:
    """(n_layers, width) activations that alpha = 0 stands for; None for the zero baseline. progress: a progress
    bar over the forwards of the mean baseline."""
    if options.baseline == "zero":
        return None
    if options.baseline == "reference":
        return kn.activations(options.baseline_prompt)
    return kn.activations_many([p for f in facts for p in f.prompts], progress=progress).mean(0)


# prompts per `attribute_many` call when --prompts-per-batch is not given, by device type: enough rows that the
# fixed cost of a pass (Python, small kernels) is shared, few enough that a CPU pass stays in memory
PROMPTS_PER_BATCH = {"cpu": 32, "cuda": 128}
# on a CPU, models of more neurons than this batch CPU_LARGE_MODEL prompts: GPT-2-small / Mamba-130M shapes ran the
# whole knowledge mode in 361 s at 32 prompts a batch and 227 s at 4 (2026-12-02; Mamba's states outgrow the cache)
LARGE_MODEL_NEURONS, CPU_LARGE_MODEL = 4096, 4


def prompts_per_batch(options: Options, device: torch.device, neurons: int) -> int:
    """The prompts per staircase batch: the option, or the device type's default (PROMPTS_PER_BATCH; 32), on a
    CPU CPU_LARGE_MODEL for models of more than LARGE_MODEL_NEURONS neurons (n_layers x width)."""
    if options.prompts_per_batch:
        return options.prompts_per_batch
    if device.type == "cpu" and neurons > LARGE_MODEL_NEURONS:
        return CPU_LARGE_MODEL
    return PROMPTS_PER_BATCH.get(device.type, 32)


def fact_batches(tokenizer, facts: Sequence[Fact], size: int) -> list[list[int]]:
    """Indices of `facts` in batches of at most `size` prompts, a fact never split (one with more prompts is a
    batch of its own). The facts are taken by their longest prompt + answer in tokens, so that the prompts of a
    batch have similar lengths and the padded clean forward wastes little."""
    texts = [prompt + continuation(prompt, f.answer) for f in facts for prompt in f.prompts]
    lengths = iter(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
    longest = [max(next(lengths) for _ in f.prompts) for f in facts]
    batches: list[list[int]] = []
    count = size  # prompts in the last batch
    for i in sorted(range(len(facts)), key=lambda i: (longest[i], i)):
        n = len(facts[i].prompts)
        if count + n > size:
            batches.append([])
            count = 0
        batches[-1].append(i)
        count += n
    return batches


def attribute_facts(kn: KnowledgeNeurons, facts: Sequence[Fact], options: Options,
                    baseline: Tensor | None) -> list[FactResult]:
    """Every prompt of several facts in one `attribute_many` call (one staircase batch), split per fact."""
    items = [(prompt, f.answer) for f in facts for prompt in f.prompts]
    names = [f"fact {f.id}" for f in facts for _ in f.prompts]
    results = kn.attribute_many(items, options.steps, "fast", options.ig_method, options.batch_size, baseline, names)
    out, start = [], 0
    for fact in facts:
        mine = results[start : start + len(fact.prompts)]
        start += len(fact.prompts)
        out.append(FactResult.of(
            fact,
            torch.stack([r.scores for r in mine]).float(),
            torch.stack([r.delta for r in mine]).float(),
            [r.probs.float() for r in mine],
            [r.prompt_ids for r in mine],
            mine[0].answer_ids,
            options,
        ))
    return out


class FactCache(FactFiles):
    """Finished facts of one model, option set and baseline (the knowledge stage).

    baseline: the activations alpha = 0 stood for (None: zeros); its bytes are part of the key, since a mean
    baseline depends on the facts it was averaged over, not only on the options.
    """

    def __init__(self, folder: Path, model_name: str, model, options: Options, baseline: Tensor | None = None):
        content = options.scores_key()
        if baseline is not None:
            content["baseline_sha256"] = hashlib.sha256(baseline.detach().cpu().double().numpy().tobytes()).hexdigest()
        super().__init__(folder, model_name, model, content)
        self.options = options

    def load(self, fact: Fact) -> FactResult | None:
        """The cached result of `fact`, or None when there is none or its file is damaged (see `FactFiles._read`)."""

        def parse(data: bytes) -> FactResult:
            d = torch.load(io.BytesIO(data), weights_only=True)
            result = FactResult.of(fact, d["scores"], d["delta"], d["probs"], d["prompt_ids"], d["answer_ids"],
                                   self.options)
            counts = {len(result.scores), len(result.delta), len(result.probs), len(result.prompt_ids)}
            if counts != {len(fact.prompts)}:
                raise ValueError(f"holds {sorted(counts)} prompts, the fact has {len(fact.prompts)}")
            return result

        return self._read(fact, parse)

    def save(self, r: FactResult) -> None:
        buf = io.BytesIO()
        torch.save({k: getattr(r, k) for k in ("scores", "delta", "probs", "prompt_ids", "answer_ids")}, buf)
        self._write(r.fact, buf.getvalue())


def find_knowledge_neurons(
    kn: KnowledgeNeurons,
    facts: Sequence[Fact],
    options: Options,
    model_name: str,
    cache_dir: Path | None = None,
    resume: bool = True,
    progress: bool = True,
    label: str | None = None,
    baseline: Tensor | str | None = FROM_FACTS,
    scores: ScoreWriter | None = None,
) -> ModelResult:
    """Attribute every prompt of every fact, the prompts of several facts per staircase batch (`fact_batches`:
    up to options.prompts_per_batch prompts, by default PROMPTS_PER_BATCH of the model's device, recorded in the
    result's options); finished facts are saved to `cache_dir` (when given) and, with
    `resume`, taken from there instead of being recomputed. `label` ("GPT-2") names the model in the progress
    bar and log (default: the folder name). baseline: the (n_layers, width) activations alpha = 0 stands for,
    None for zeros, or FROM_FACTS: `baseline_activations` of these facts and options (the pipeline computes it
    once from all facts and passes it on, as it attributes them in shares). scores: a score file (analysis.scores)
    that each fact's scores go to as soon as the fact is done; the result then holds none (FactResult.scores
    None), so that memory does not grow with the prompts."""
    label = label or Path(model_name).name
    if isinstance(baseline, str):
        baseline = baseline_activations(kn, facts, options)
    cache = FactCache(cache_dir, model_name, kn.model, options, baseline) if cache_dir else None
    options = dataclasses.replace(options, prompts_per_batch=prompts_per_batch(options, kn.adapter.device,
                                                                                 kn.n_layers * kn.width))

    def done(r: FactResult | None) -> FactResult | None:
        if r is None or scores is None:
            return r
        scores.add(r.fact.id, r.scores, r.delta)
        return dataclasses.replace(r, scores=None)

    results: list[FactResult | None] = [done(cache.load(f)) if cache and resume else None for f in facts]
    uncached = [i for i, r in enumerate(results) if r is None]
    reused = len(facts) - len(uncached)
    with tqdm(total=len(facts), initial=reused, desc=f"knowledge neurons {label}", unit="fact",
              disable=not progress) as bar:
        for batch in fact_batches(kn.tokenizer, [facts[i] for i in uncached], options.prompts_per_batch):
            for i, result in zip(batch, attribute_facts(kn, [facts[uncached[i]] for i in batch], options, baseline),
                                 strict=True):
                if cache:
                    cache.save(result)
                results[uncached[i]] = done(result)
            bar.update(len(batch))
    if reused:
        log.info("%s: reused %d of %d facts from %s", label, reused, len(facts), cache.folder)
    arch = kn.model.config.model_type
    return ModelResult(model_name, arch, kn.adapter.neuron_site, kn.n_layers, kn.width, options, results)


def _neurons(ns: Sequence[Neuron]) -> list[list]:
    return [[lay, i, s] for lay, i, s in ns]


def knowledge_json(result: ModelResult, tokenizer, scores_files: Sequence[str] = ()) -> dict:
    """The JSON document of `python main.py knowledge` for one model; `scores_files`: the score files of the run
    (analysis.scores), named in it."""
    o = result.options
    refined = result.refined
    facts = []
    for r in result.facts:
        prompts = []
        for k, prompt in enumerate(r.fact.prompts):
            probs = r.probs[k]
            prompts.append({
                "prompt": prompt,
                "tokens": tokenizer.convert_ids_to_tokens(r.prompt_ids[k]),
                "p_answer": float(probs.prod()),
                "p_answer_tokens": probs.tolist(),
                "n_coarse_neurons": r.n_coarse[k],
                "max_abs_completeness_delta": float(r.delta[k].abs().max()),
            })
        facts.append({
            "id": r.fact.id,
            "relation": r.fact.relation,
            "subject": r.fact.subject,
            "answer": r.fact.answer,
            "answer_tokens": tokenizer.convert_ids_to_tokens(r.answer_ids),
            "prompts": prompts,
            "refined_neurons": _neurons(refined[r.fact.id]),
            "n_refined": len(refined[r.fact.id]),
        })
    return {
        "model": result.name,
        "architecture": result.architecture,
        "n_layers": result.n_layers,
        "neurons_per_layer": result.width,
        "neuron_site": result.neuron_site,
        "options": dataclasses.asdict(o),
        "seed": o.seed,
        "versions": versions(),
        "score_definition": "mean over answer tokens of (a - baseline) * sum_k w_k dP(answer token)/d(scaled a), "
        "P = softmax probability over the full vocabulary at the position predicting the token",
        "neuron_format": "[layer, neuron index, score]",
        "facts": facts,
        "layer_distribution": result.layer_distribution,
        "overlap": result.overlap,
        "scores_files": list(scores_files),
    }


def write_knowledge(result: ModelResult, tokenizer, out_dir: Path, stem: str, extra: dict | None = None,
                    scores_files: Sequence[str] = ()) -> dict:
    """`<stem>.json` in `out_dir`, naming the score files the stage wrote (`find_knowledge_neurons(..., scores=)`);
    `extra` entries (e.g. the command-line arguments) are added to it."""
    doc = {**knowledge_json(result, tokenizer, scores_files), **(extra or {})}
    write_json(Path(out_dir) / f"{stem}.json", doc)
    return doc


def _mean_p(r: FactResult) -> float:
    return float(np.mean([float(p.prod()) for p in r.probs]))


def knowledge_tables(results: dict[str, ModelResult]) -> str:
    """Console tables: refined neurons per fact, knowledge neurons per layer, and the models side by side."""
    labels = list(results)
    first = results[labels[0]]
    refined = {lab: res.refined for lab, res in results.items()}
    per_fact = [
        [r.fact.id, r.fact.relation]
        + [x for lab in labels for x in (len(refined[lab][r.fact.id]), _mean_p(results[lab].facts[k]))]
        for k, r in enumerate(first.facts)
    ]
    fact_headers = ["fact", "relation"] + [h for lab in labels for h in (f"{lab} KN", f"{lab} P(ans)")]
    title = "Refined knowledge neurons per fact (and mean P(answer) over its prompts)"
    if len(per_fact) > TABLE_MAX_FACTS:
        title, fact_headers, per_fact = _per_relation(per_fact, labels)
    profiles = {lab: res.layer_distribution for lab, res in results.items()}
    depth = max(len(p) for p in profiles.values())
    per_layer = [
        [layer] + [int(p[layer]) if layer < len(p) else None for p in profiles.values()] for layer in range(depth)
    ]
    side = [[name] + [fn(res) for res in results.values()] for name, fn in _COMPARISON]
    return "\n\n".join([
        title,
        table(fact_headers, per_fact),
        "Knowledge neurons per layer (summed over facts)",
        table(["layer", *labels], per_layer),
        "Side by side",
        table(["", *labels], side),
    ])


def _per_relation(per_fact: list[list], labels: list[str]) -> tuple[str, list[str], list[list]]:
    """The per-fact rows ([fact, relation, KN, P(ans) per model]) collapsed to one row a relation (means)."""
    by_relation: dict[str, list[list]] = {}
    for row in per_fact:
        by_relation.setdefault(row[1], []).append(row[2:])
    rows = [[relation, len(members), *np.mean(np.array(members, dtype=float), axis=0).tolist()]
            for relation, members in sorted(by_relation.items())]
    headers = ["relation", "facts"] + [h for lab in labels for h in (f"{lab} mean KN", f"{lab} mean P(ans)")]
    title = (f"Refined knowledge neurons per relation ({len(per_fact)} facts, more than {TABLE_MAX_FACTS}: means over "
             "each relation's facts; the per-fact values are in each model's <label>_knowledge_neurons.json, "
             "facts[].n_refined and facts[].prompts[].p_answer)")
    return title, headers, rows


def _overlap(res: ModelResult, split: str, what: str) -> float | None:
    return res.overlap["all_layers"][split][what]["mean"]


def _peak(res: ModelResult) -> float | str | None:
    """The layer holding most knowledge neurons as a fraction of the depth; every one of them when layers tie."""
    counts = np.asarray(res.layer_distribution)
    if not counts.any():
        return None
    peaks = np.flatnonzero(counts == counts.max()) / max(1, res.n_layers - 1)
    return float(peaks[0]) if len(peaks) == 1 else f"{', '.join(f'{p:.3g}' for p in peaks)} (tie)"


_COMPARISON = [
    ("layers", lambda r: r.n_layers),
    ("neurons per layer", lambda r: r.width),
    ("mean refined KN per fact", lambda r: float(np.mean([len(v) for v in r.refined.values()]))),
    ("facts with >= 1 KN", lambda r: sum(bool(v) for v in r.refined.values())),
    ("peak layer (fraction of depth)", lambda r: _peak(r)),
    ("intra-relation Jaccard", lambda r: _overlap(r, "intra", "jaccard")),
    ("inter-relation Jaccard", lambda r: _overlap(r, "inter", "jaccard")),
    ("intra-relation intersection", lambda r: _overlap(r, "intra", "intersection")),
    ("inter-relation intersection", lambda r: _overlap(r, "inter", "intersection")),
    ("mean P(answer)", lambda r: float(np.mean([_mean_p(f) for f in r.facts]))),
    ("max |completeness delta|", lambda r: float(max(f.delta.abs().max() for f in r.facts))),
]
