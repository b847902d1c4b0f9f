"""The modes of `main.py`, as sequences of calls into the analysis modules."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

from analysis.interventions import run_interventions
from analysis.overlap import incidence, write_pairs_file
from analysis.scores import remove_stale, save_scores_mode, score_file, score_file_names
from analysis.significance import PairJaccard, bootstrap_relation_means, permutation_test
from analysis.stage import (
    ModelResult,
    Options,
    baseline_activations,
    find_knowledge_neurons,
    knowledge_tables,
    write_knowledge,
)
from analysis.tracing import TraceOptions, trace_model
from attention_neurons import mamba_attention_analysis, subject_mixing
from common.errors import UserError
from common.outputs import versions, write_json, write_text
from common.sampling import sample_indices
from editing.stage import editing_report, editing_stage, editing_table
from facts import Fact
from knowledge_neurons import KnowledgeNeurons
from models import ADAPTERS, SSMAdapter, load_config, load_model
from models.demo import is_demo_model
from report.attention_figures import plot_hidden_attention, plot_subject_flow, units
from report.figures import (
    FACT_MATRIX_MAX_FACTS,
    jaccard_scale,
    named,
    plot_interventions,
    plot_jaccard_matrix,
    plot_layer_distribution,
    plot_relation_jaccard,
)
from report.findings import completeness
from report.markdown import attention_table, comprehensive_report, demo_caveat, interventions_table
from report.trace_figures import plot_aie_curves, plot_trace_heatmaps
from report.trace_report import trace_section, trace_table
from run import distributed

log = logging.getLogger(__name__)

ATTENTION_FIGURES = 30  # hidden-attention maps drawn, of the facts the attention stage analyses


NOT_OPTIONS = ("quiet", "warnings", "dropped_relations")  # attributes main.py adds to the parsed options


def arguments(args: argparse.Namespace) -> dict:
    """The command-line options as given, stored in every output so each number traces back to them."""
    return {k: v for k, v in vars(args).items() if k not in NOT_OPTIONS}


def notes(args: argparse.Namespace) -> dict:
    """What the checks said about the input, stored beside the arguments in every output: `warnings` (options the
    run ignores) and `dropped_relations` (ParaRel relations that gave no fact -> why)."""
    return {"warnings": list(getattr(args, "warnings", [])),
            "dropped_relations": dict(getattr(args, "dropped_relations", {}))}


def options_from(args: argparse.Namespace) -> Options:
    return Options(
        steps=args.steps, ig_method=args.ig_method, threshold=args.threshold, share=args.share,
        batch_size=args.batch_size, baseline=args.baseline, baseline_prompt=args.baseline_prompt, seed=args.seed,
        prompts_per_batch=args.prompts_per_batch,
    )


@dataclass
class Analysed:
    """One model after the knowledge stage: its result, the engine holding the model, the written JSON."""

    result: ModelResult
    kn: KnowledgeNeurons
    doc: dict


def architectures(names: dict[str, str]) -> dict[str, str]:
    """label -> config.model_type of each model (from its config, without the weights)."""
    return {label: load_config(name).model_type for label, name in names.items()}


def caveat_of(names: dict[str, str]) -> str | None:
    """The demo caveat (report.markdown.demo_caveat), naming each demo model by label and architecture."""
    return demo_caveat(names, architectures(names))


def _pairs_file(result: ModelResult, out: Path, label: str) -> str:
    """Writes <label>_overlap_pairs.jsonl.gz (every pair of facts, streamed); returns its name in `out`."""
    name = f"{label}_overlap_pairs.jsonl.gz"
    write_pairs_file(incidence(result.neuron_sets(), result.relations(), result.n_layers), out / name)
    log.info("wrote %s", out / name)
    return name


def knowledge_stage(args: argparse.Namespace, facts: Sequence[Fact], names: dict[str, str]) -> dict[str, Analysed]:
    """Knowledge neurons of every model (label -> name); writes <label>_knowledge_neurons.json and
    its score files (analysis.scores: one a rank under torchrun) to --out."""
    options = options_from(args)
    out = Path(args.out)
    done = {}
    for label, name in names.items():
        model, tokenizer = load_model(name, args.device)
        kn = KnowledgeNeurons(model, tokenizer)
        # from all facts: under torchrun, every rank alike
        baseline = baseline_activations(kn, facts, options, progress=not args.quiet and distributed.is_main())
        stem, n_prompts = f"{label}_knowledge_neurons", sum(len(f.prompts) for f in facts)
        mine = replace(options, save_scores=save_scores_mode(args.save_scores, n_prompts, kn.n_layers, kn.width, label))
        # each rank streams the scores of its facts to its own file; rank 0 receives only the per-fact results
        files = [] if mine.save_scores == "none" else score_file_names(stem, distributed.world_size())
        with score_file(out / files[distributed.rank()], mine.save_scores, mine.threshold) if files \
                else nullcontext() as scores:
            attribute = partial(find_knowledge_neurons, kn, options=mine, model_name=name, baseline=baseline,
                                cache_dir=out / ".kn_cache", resume=not args.fresh, label=label, scores=scores)
            result = distributed.shard_and_gather(attribute, kn, facts, progress=not args.quiet, label=label)
        if result is None:  # under torchrun, ranks other than 0 only attribute their share
            continue
        extra = {"arguments": arguments(args), **notes(args),
                 "pairs_file": _pairs_file(result, out, label) if args.pairs_file else None}
        doc = write_knowledge(result, tokenizer, out, stem, extra, files)
        remove_stale(out, stem, files)
        log.info("wrote %s", out / f"{stem}.json")
        unconverged = completeness(label, result)
        if unconverged:
            log.warning("warning: %s", unconverged)
        done[label] = Analysed(result, kn, doc)
    return done


def run_knowledge(args: argparse.Namespace, facts: Sequence[Fact], names: dict[str, str]) -> None:
    done = knowledge_stage(args, facts, names)
    if not distributed.is_main():
        return
    print(knowledge_tables({label: d.result for label, d in done.items()}))


def run_edit(args: argparse.Namespace, facts: Sequence[Fact], names: dict[str, str]) -> None:
    done = knowledge_stage(args, facts, names)
    if not distributed.is_main():
        return
    print(editing_table(editing_stage(args, done, arguments(args), notes(args)).docs))


def _attention_figures(model, tokenizer, facts: Sequence[Fact], folder: Path, prefix: str, n_layers: int,
                       caveat: str | None, name: str) -> list[Path]:
    """Unit-averaged hidden-attention maps of each fact's first prompt at four layers across the depth; `name`
    titles them (label and architecture)."""
    layers = sorted({round(k * (n_layers - 1) / 3) for k in range(4)})
    return [
        plot_hidden_attention(model, tokenizer, f.prompts[0], layers, folder / f"{prefix}{f.id}.png",
                              subject=f.subject, caveat=caveat, name=name)
        for f in facts
    ]


def state_space_labels(names: dict[str, str]) -> list[str]:
    """The labels of the models whose token mixing is a selective scan (hidden attention, exact token flow)."""
    return [label for label, name in names.items() if issubclass(ADAPTERS[load_config(name).model_type], SSMAdapter)]


def attention_stage(args: argparse.Namespace, facts: Sequence[Fact], names: dict[str, str],
                    done: dict[str, Analysed]) -> dict:
    """Token mixing of every model from the answer position (a transformer's attention, a state-space model's
    hidden attention), and for state-space models the exact token -> knowledge-neuron flow and hidden-attention
    maps. `done` holds the knowledge stage of (at least) the state-space models; other models are loaded.

    Writes mamba_analysis.json and the figures under <out>/figures; returns the JSON document. Its top-level
    `hidden_attention` / `gpt2_attention` are those of the first state-space model / first transformer.
    """
    out, caveat = Path(args.out), caveat_of(names)
    ssm = state_space_labels(names)
    every = facts
    facts = [every[i] for i in sample_indices(len(every), args.attention_facts, args.seed, "attention facts")]
    drawn = facts[:ATTENTION_FIGURES]
    models, maps, flows = {}, [], {}
    for label, name in names.items():
        kn = done[label].kn if label in done else KnowledgeNeurons(*load_model(name, args.device))
        entry = {"model": name, "architecture": kn.model.config.model_type,
                 "token_mixing": subject_mixing(kn.model, kn.tokenizer, facts), "hidden_attention": None}
        if label in ssm:
            entry["hidden_attention"] = mamba_attention_analysis(kn.model, kn.tokenizer, facts,
                                                                 done[label].result.refined, progress=not args.quiet,
                                                                 label=label)
            first = label == ssm[0]  # the first keeps the file names of the default pair
            maps += _attention_figures(kn.model, kn.tokenizer, drawn, out / "figures",
                                       "hidden_attention_" if first else f"hidden_attention_{label}_", kn.n_layers,
                                       caveat, named(label, entry["architecture"]))
        models[label] = entry
    transformers_ = [label for label in names if label not in ssm]
    beside = models[transformers_[0]]["token_mixing"] if transformers_ else None
    for label in ssm:
        path = out / "figures" / ("subject_flow_by_layer.png" if label == ssm[0] else f"subject_flow_{label}.png")
        flows[label] = plot_subject_flow(models[label]["hidden_attention"], path, beside, caveat,
                                         name=named(label, models[label]["architecture"]),
                                         unit=units(models[label]["architecture"]),
                                         beside_name=named(transformers_[0], models[transformers_[0]]["architecture"])
                                         if transformers_ else None)
    options = next(iter(done.values())).result.options
    doc = {
        "model": names[ssm[0]] if ssm else None,
        "gpt2_model": names[transformers_[0]] if transformers_ else None,
        "options": asdict(options),
        "arguments": arguments(args),
        **notes(args),
        "seed": options.seed,
        "versions": versions(),
        "hidden_attention": models[ssm[0]]["hidden_attention"] if ssm else None,
        "gpt2_attention": beside,
        "models": models,
        "sampling": {
            "facts": len(every), "facts_analysed": len(facts), "attention_facts": args.attention_facts,
            "seed": args.seed, "hidden_attention_figures": len(drawn),
            "method": "token mixing, hidden attention and token flow on a seeded sample of --attention-facts facts "
                      f"without replacement, in table order (all when fewer); hidden-attention maps of the first "
                      f"{ATTENTION_FIGURES} of them",
        },
        "figures": {
            "hidden_attention": [str(f.relative_to(out)) for f in maps],
            **({"subject_flow": str(flows[ssm[0]].relative_to(out))} if ssm else {}),
            "subject_flow_by_model": {label: str(f.relative_to(out)) for label, f in flows.items()},
        },
    }
    write_json(out / "mamba_analysis.json", doc)
    log.info("wrote %s and %d figures", out / "mamba_analysis.json", len(maps) + len(flows))
    return doc


def run_attention(args: argparse.Namespace, facts: Sequence[Fact], names: dict[str, str]) -> None:
    ssm = state_space_labels(names)
    if not ssm:
        raise UserError("attention mode needs a state-space model (Mamba, Mamba-2, Falcon-Mamba) among the models")
    stage = knowledge_stage(args, facts, {label: names[label] for label in ssm})
    if not distributed.is_main():
        return
    doc = attention_stage(args, facts, names, stage)
    print(attention_table(doc))


def trace_options(args: argparse.Namespace) -> TraceOptions:
    return TraceOptions(corruption=args.corruption, noise=args.noise, samples=args.trace_samples,
                        window=args.trace_window, knockout_window=args.knockout_window, seed=args.seed,
                        random_draws=args.random_draws, bootstrap=args.bootstrap)


HEATMAP_FACTS = 3  # ROME-style heatmaps for the first facts of each model


def trace_stage(args: argparse.Namespace, facts: Sequence[Fact], done: dict[str, Analysed],
                names: dict[str, str]) -> dict:
    """Causal tracing, knockout and the knowledge-neuron cross-check of every model -> <label>_causal_trace.json;
    the figures under <out>/figures. Returns label -> the JSON document."""
    out, caveat, options = Path(args.out), demo_caveat(names), trace_options(args)
    sample = [facts[i] for i in sample_indices(len(facts), args.trace_facts, args.seed, "trace facts")]
    docs = {}
    for label, d in done.items():
        traced = trace_model(d.kn.model, d.kn.tokenizer, facts, d.result.refined, options, progress=not args.quiet,
                             label=label, traced=sample, cache_dir=out / ".kn_cache", resume=not args.fresh,
                             model_name=names[label])
        traced["sampling"] = {"facts": len(facts), "facts_traced": len(sample), "trace_facts": args.trace_facts,
                              "seed": args.seed}
        heatmaps = plot_trace_heatmaps(traced, named(label, d.kn.model.config.model_type), out / "figures",
                                       f"causal_trace_{label}_", HEATMAP_FACTS, caveat)
        doc = {"model": names[label], "label": label, "architecture": d.kn.model.config.model_type,
               "demo": is_demo_model(names[label]), **traced,
               "figures": {"heatmaps": [str(f.relative_to(out)) for f in heatmaps]},
               "arguments": arguments(args), "versions": versions()}
        docs[label] = doc
    curves = plot_aie_curves({named(label, doc["architecture"]): doc["summary"] for label, doc in docs.items()},
                             out / "figures" / "causal_trace_aie.png", caveat)
    for label, doc in docs.items():
        doc["figures"]["aie_curves"] = str(curves.relative_to(out))
        write_json(out / f"{label}_causal_trace.json", doc)
        log.info("wrote %s", out / f"{label}_causal_trace.json")
    return docs


def run_trace(args: argparse.Namespace, facts: Sequence[Fact], names: dict[str, str]) -> None:
    done = knowledge_stage(args, facts, names)
    if not distributed.is_main():
        return
    docs = trace_stage(args, facts, done, names)
    print(trace_table({named(label, doc["architecture"]): doc for label, doc in docs.items()}))


def relation_statistics(result: ModelResult, args: argparse.Namespace) -> dict:
    """Intra- vs inter-relation Jaccard: permutation test over relation labels and bootstrap CIs of both means
    (facts resampled within relations), both exact over every pair from the sparse pair entries."""
    sets, relations = result.neuron_sets(), result.relations()
    pairs = PairJaccard.of(sets, relations)
    return {
        "permutation_test": permutation_test(sets, relations, args.permutations, args.seed, pairs=pairs),
        "bootstrap": bootstrap_relation_means(sets, relations, args.bootstrap, args.seed, pairs=pairs),
    }


def _jaccard_key(label: str, result: ModelResult) -> str:
    """The figures key of a model's Jaccard figure: fact x fact up to FACT_MATRIX_MAX_FACTS facts, else relations."""
    return f"jaccard_{label}" if len(result.facts) <= FACT_MATRIX_MAX_FACTS else f"jaccard_relations_{label}"


def _jaccard_figure(result: ModelResult, label: str, out: Path, caveat: str | None, vmax: float | None) -> Path:
    """The fact x fact Jaccard figure (colour scale up to `vmax`) up to FACT_MATRIX_MAX_FACTS facts, else the
    relation x relation heatmap."""
    if len(result.facts) <= FACT_MATRIX_MAX_FACTS:
        return plot_jaccard_matrix(result, label, out / "figures" / f"jaccard_{label}.png", caveat, vmax=vmax)
    return plot_relation_jaccard(result, label, out / "figures" / f"jaccard_relations_{label}.png", caveat)


def run_comprehensive(args: argparse.Namespace, facts: Sequence[Fact], names: dict[str, str]) -> None:
    out = Path(args.out)
    caveat = caveat_of(names)
    done = knowledge_stage(args, facts, names)
    if not distributed.is_main():  # the later stages run on rank 0 alone
        return
    attention = attention_stage(args, facts, names, done) if state_space_labels(names) else None
    per_model = {}
    for label, d in done.items():
        start = time.perf_counter()
        per_model[label] = {
            "interventions": run_interventions(d.kn, facts, d.result.refined, args.random_draws, args.seed,
                                               progress=not args.quiet, label=label, cross_facts=args.cross_facts),
            "statistics": relation_statistics(d.result, args),
        }
        log.info("interventions and statistics %s: %d facts in %.1f s", label, len(facts), time.perf_counter() - start)
    editing = editing_stage(args, done, arguments(args), notes(args))
    traces = trace_stage(args, facts, done, names)
    results = {label: d.result for label, d in done.items()}
    summaries = {label: m["interventions"]["summary"] for label, m in per_model.items()}
    # one colour scale for every model's fact x fact Jaccard figure (those up to FACT_MATRIX_MAX_FACTS facts)
    scale = jaccard_scale(d.result for d in done.values() if len(d.result.facts) <= FACT_MATRIX_MAX_FACTS)
    figures = {
        "layer_distribution": plot_layer_distribution(results, out / "figures" / "knowledge_neurons_per_layer.png",
                                                      caveat),
        "interventions": plot_interventions(summaries, out / "figures" / "interventions.png", caveat),
        **{_jaccard_key(label, d.result): _jaccard_figure(d.result, label, out, caveat, scale)
           for label, d in done.items()},
    }
    main = next((label for label in (attention or {}).get("models", {}) if attention["models"][label][
        "hidden_attention"] is not None), next(iter(done)))  # the first state-space model, else the first model
    doc = {
        "model": done[main].result.name,
        "label": main,
        "options": {**asdict(done[main].result.options), "random_draws": args.random_draws,
                    "permutations": args.permutations, "bootstrap": args.bootstrap, "cross_facts": args.cross_facts},
        "arguments": arguments(args),
        **notes(args),
        "seed": args.seed,
        "versions": versions(),
        "knowledge_neurons": done[main].doc,
        "hidden_attention": attention["models"][main]["hidden_attention"] if attention else None,
        "interventions": per_model[main]["interventions"],
        "statistics": per_model[main]["statistics"],
        "comparison": {
            label: {
                "model": d.result.name,
                "layer_distribution": d.result.layer_distribution,
                "interventions": per_model[label]["interventions"],
                "statistics": per_model[label]["statistics"],
                "attention": attention["models"][label]["token_mixing"] if attention else None,
                "hidden_attention": attention["models"][label]["hidden_attention"] if attention else None,
            }
            for label, d in done.items() if label != main
        },
        "files": {
            **{f"{label}_knowledge_neurons": f"{label}_knowledge_neurons.json" for label in done},
            **{f"{label}_knowledge_neurons_scores": d.doc["scores_files"] for label, d in done.items()},
            **{f"{label}_overlap_pairs": d.doc["pairs_file"] for label, d in done.items() if d.doc["pairs_file"]},
            **({"mamba_analysis": "mamba_analysis.json"} if attention else {}),
            "report": "report.md",
            "knowledge_editing": editing.files,
            "causal_trace": {label: f"{label}_causal_trace.json" for label in traces},
            "figures": {**{k: str(v.relative_to(out)) for k, v in figures.items()},
                        **(attention["figures"] if attention else {}), "knowledge_editing": editing.figure,
                        "causal_trace": {label: doc["figures"] for label, doc in traces.items()}},
        },
    }
    write_json(out / "mamba_comprehensive_analysis.json", doc)
    write_text(out / "report.md", comprehensive_report(doc, results, per_model, attention, caveat)
               + editing_report(editing)
               + trace_section({named(label, doc["architecture"]): doc for label, doc in traces.items()}, caveat))
    print(knowledge_tables(results))
    print()
    print(interventions_table(summaries))
    print()
    print(editing_table(editing.docs))
    print()
    print(trace_table({named(label, doc["architecture"]): doc for label, doc in traces.items()}))
    log.info("wrote %s and %s", out / "mamba_comprehensive_analysis.json", out / "report.md")
