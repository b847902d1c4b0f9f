"""The three modes of `main.py`, as sequences of calls into the analysis modules."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import distributed
from analysis import (
    ModelResult,
    Options,
    find_knowledge_neurons,
    knowledge_tables,
    write_knowledge,
)
from attention_figures import plot_hidden_attention, plot_subject_flow
from attention_neurons import gpt2_subject_attention, mamba_attention_analysis
from editing_stage import editing_report, editing_stage, editing_table
from errors import UserError
from facts import Fact
from figures import plot_interventions, plot_jaccard_matrix, plot_layer_distribution
from interventions import run_interventions
from knowledge_neurons import KnowledgeNeurons
from models import load_model
from outputs import versions, write_json, write_text
from report import LABELS, attention_table, comprehensive_report, demo_caveat, interventions_table
from statistics_kn import bootstrap_ci, permutation_test

log = logging.getLogger(__name__)


def arguments(args: argparse.Namespace) -> dict:
    """The command-line options as given, stored in every output so each number traces back to them."""
    return {k: v for k, v in vars(args).items() if k != "quiet"}


def options_from(args: argparse.Namespace) -> Options:
    return Options(
        steps=args.steps, ig_method=args.ig_method, threshold=args.threshold, share=args.share,
        batch_size=args.batch_size, baseline=args.baseline, baseline_prompt=args.baseline_prompt, seed=args.seed,
    )


@dataclass
class Analysed:
    """One model after the knowledge stage: its result, the engine holding the model, the written JSON."""

    result: ModelResult
    kn: KnowledgeNeurons
    doc: dict


def knowledge_stage(
    args: argparse.Namespace, facts: Sequence[Fact], names: dict[str, str], archs: Sequence[str]
) -> dict[str, Analysed]:
    """Knowledge neurons of each architecture's model; writes <arch>_knowledge_neurons.json/.npz to --out."""
    options = options_from(args)
    out = Path(args.out)
    done = {}
    for arch in archs:
        model, tokenizer = load_model(names[arch], args.device)
        if model.config.model_type != arch:
            raise UserError(f"--{arch}-model {names[arch]} is a '{model.config.model_type}' model, not {arch}")
        kn = KnowledgeNeurons(model, tokenizer)
        attribute = partial(find_knowledge_neurons, kn, options=options, model_name=names[arch],
                            cache_dir=out / ".kn_cache", resume=not args.fresh, label=LABELS[arch])
        result = distributed.shard_and_gather(attribute, kn, facts, progress=not args.quiet)
        if result is None:  # under torchrun, ranks other than 0 only attribute their share
            continue
        doc = write_knowledge(result, tokenizer, out, f"{arch}_knowledge_neurons", {"arguments": arguments(args)})
        log.info("wrote %s", out / f"{arch}_knowledge_neurons.json")
        done[arch] = Analysed(result, kn, doc)
    return done


def run_knowledge(args: argparse.Namespace, facts: Sequence[Fact], names: dict[str, str]) -> None:
    done = knowledge_stage(args, facts, names, ("gpt2", "mamba"))
    if not distributed.is_main():
        return
    print(knowledge_tables({LABELS[a]: d.result for a, d in done.items()}))


def run_edit(args: argparse.Namespace, facts: Sequence[Fact], names: dict[str, str]) -> None:
    done = knowledge_stage(args, facts, names, ("gpt2", "mamba"))
    print(editing_table(editing_stage(args, done, arguments(args)).docs))


def _attention_figures(model, tokenizer, facts: Sequence[Fact], out: Path, n_layers: int,
                       caveat: str | None) -> list[Path]:
    """Channel-averaged hidden-attention maps of each fact's first prompt at four layers across the depth."""
    layers = sorted({round(k * (n_layers - 1) / 3) for k in range(4)})
    return [
        plot_hidden_attention(model, tokenizer, f.prompts[0], layers, out / f"hidden_attention_{f.id}.png",
                              subject=f.subject, caveat=caveat)
        for f in facts
    ]


def attention_stage(args: argparse.Namespace, facts: Sequence[Fact], names: dict[str, str],
                    mamba: Analysed, gpt2_kn: KnowledgeNeurons | None = None) -> dict:
    """Hidden attention and token -> knowledge-neuron flow for Mamba, GPT-2 attention beside it.

    Writes mamba_analysis.json and the figures under <out>/figures; returns the JSON document. The GPT-2
    model is loaded unless `gpt2_kn` already holds it.
    """
    result, kn = mamba.result, mamba.kn
    out = Path(args.out)
    caveat = demo_caveat(names)
    analysis = mamba_attention_analysis(kn.model, kn.tokenizer, facts, result.refined, progress=not args.quiet,
                                        label=LABELS["mamba"])
    gpt2_model, gpt2_tokenizer = (gpt2_kn.model, gpt2_kn.tokenizer) if gpt2_kn else load_model(names["gpt2"],
                                                                                             args.device)
    gpt2 = gpt2_subject_attention(gpt2_model, gpt2_tokenizer, facts)
    maps = _attention_figures(kn.model, kn.tokenizer, facts, out / "figures", kn.n_layers, caveat)
    flow = plot_subject_flow(analysis, out / "figures" / "subject_flow_by_layer.png", gpt2, caveat)
    doc = {
        "model": result.name,
        "gpt2_model": names["gpt2"],
        "options": asdict(result.options),
        "arguments": arguments(args),
        "seed": result.options.seed,
        "versions": versions(),
        "hidden_attention": analysis,
        "gpt2_attention": gpt2,
        "figures": {
            "hidden_attention": [str(f.relative_to(out)) for f in maps],
            "subject_flow": str(flow.relative_to(out)),
        },
    }
    write_json(out / "mamba_analysis.json", doc)
    log.info("wrote %s and %d figures", out / "mamba_analysis.json", len(maps) + 1)
    return doc


def run_attention(args: argparse.Namespace, facts: Sequence[Fact], names: dict[str, str]) -> None:
    stage = knowledge_stage(args, facts, names, ("mamba",))
    if not distributed.is_main():
        return
    doc = attention_stage(args, facts, names, stage["mamba"])
    print(attention_table(doc))


def relation_statistics(result: ModelResult, args: argparse.Namespace) -> dict:
    """Intra- vs inter-relation Jaccard: permutation test over relation labels and bootstrap CIs of both means."""
    pairs = result.overlap["pairs"]
    return {
        "permutation_test": permutation_test(result.neuron_sets(), result.relations(), args.permutations, args.seed),
        "bootstrap": {
            split: bootstrap_ci([p["jaccard"] for p in pairs if p["same_relation"] == same], args.bootstrap,
                                args.seed)
            for split, same in (("intra_jaccard", True), ("inter_jaccard", False))
        },
    }


def run_comprehensive(args: argparse.Namespace, facts: Sequence[Fact], names: dict[str, str]) -> None:
    out = Path(args.out)
    caveat = demo_caveat(names)
    done = knowledge_stage(args, facts, names, ("gpt2", "mamba"))
    if not distributed.is_main():  # the later stages run on rank 0 alone
        return
    attention = attention_stage(args, facts, names, done["mamba"], gpt2_kn=done["gpt2"].kn)
    per_model = {}
    for arch, d in done.items():
        per_model[arch] = {
            "interventions": run_interventions(d.kn, facts, d.result.refined, args.random_draws, args.seed,
                                               progress=not args.quiet, label=LABELS[arch]),
            "statistics": relation_statistics(d.result, args),
        }
    editing = editing_stage(args, done, arguments(args))
    results = {LABELS[a]: d.result for a, d in done.items()}
    summaries = {LABELS[a]: m["interventions"]["summary"] for a, m in per_model.items()}
    figures = {
        "layer_distribution": plot_layer_distribution(results, out / "figures" / "knowledge_neurons_per_layer.png",
                                                      caveat),
        "interventions": plot_interventions(summaries, out / "figures" / "interventions.png", caveat),
        **{f"jaccard_{arch}": plot_jaccard_matrix(d.result, LABELS[arch], out / "figures" / f"jaccard_{arch}.png",
                                                  caveat)
           for arch, d in done.items()},
    }
    mamba_result = done["mamba"].result
    doc = {
        "model": mamba_result.name,
        "options": {**asdict(mamba_result.options), "random_draws": args.random_draws,
                    "permutations": args.permutations, "bootstrap": args.bootstrap},
        "arguments": arguments(args),
        "seed": args.seed,
        "versions": versions(),
        "knowledge_neurons": done["mamba"].doc,
        "hidden_attention": attention["hidden_attention"],
        "interventions": per_model["mamba"]["interventions"],
        "statistics": per_model["mamba"]["statistics"],
        "comparison": {
            "gpt2": {
                "model": done["gpt2"].result.name,
                "layer_distribution": done["gpt2"].result.layer_distribution,
                "interventions": per_model["gpt2"]["interventions"],
                "statistics": per_model["gpt2"]["statistics"],
                "attention": attention["gpt2_attention"],
            },
        },
        "files": {
            **{f"{arch}_knowledge_neurons": f"{arch}_knowledge_neurons.json" for arch in done},
            **{f"{arch}_knowledge_neurons_scores": d.doc["scores_file"] for arch, d in done.items()},
            "mamba_analysis": "mamba_analysis.json",
            "report": "report.md",
            "knowledge_editing": editing.files,
            "figures": {**{k: str(v.relative_to(out)) for k, v in figures.items()}, **attention["figures"],
                        "knowledge_editing": editing.figure},
        },
    }
    write_json(out / "mamba_comprehensive_analysis.json", doc)
    write_text(out / "report.md", comprehensive_report(doc, results, per_model, attention, caveat)
               + editing_report(editing))
    print(knowledge_tables(results))
    print()
    print(interventions_table(summaries))
    print()
    print(editing_table(editing.docs))
    log.info("wrote %s and %s", out / "mamba_comprehensive_analysis.json", out / "report.md")
