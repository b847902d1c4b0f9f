"""Knowledge neurons in GPT-2 and Mamba: the command line.

    python main.py [comprehensive|attention|knowledge|edit|trace] [options]

This module parses options, picks the models and calls the analysis modules in order; it holds no maths.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

import torch

from analysis.stage import BASELINES, Options
from analysis.tracing import TraceOptions
from causal_tracing import CORRUPTIONS
from common.allocator import ALLOCATORS, retain_freed_memory
from common.errors import UserError
from editing.edits import RULES, EditOptions
from facts import FACTS, Fact, load_facts, select_facts
from knowledge_neurons import IG_METHODS
from run import distributed
from sources.pararel import read_pararel

log = logging.getLogger("knowledge_neurons")

MODES = {  # "the models": GPT-2 and Mamba by default, or those of --models
    "comprehensive": "everything: knowledge neurons of the models, hidden attention of the state-space models, "
    "interventions with random controls, statistics, knowledge editing, figures and a Markdown report (the default)",
    "attention": "knowledge neurons of the state-space models + hidden attention and token -> knowledge-neuron "
    "flow, every model's token mixing (a transformer's attention) for comparison -> mamba_analysis.json and figures",
    "knowledge": "knowledge neurons of the models, overlap statistics -> <label>_knowledge_neurons.json "
    "(gpt2_..., mamba_...) + .npz score tensors",
    "edit": "knowledge neurons, then knowledge editing (Dai et al.): update every fact and erase every relation "
    "through knowledge neurons vs random neurons -> <label>_knowledge_editing.json",
    "trace": "knowledge neurons, then causal tracing (Meng et al.: corrupt the subject, restore one clean state), "
    "knockout of the last position's reading (Geva et al.; hidden attention for state-space models) and the "
    "knowledge neurons restored vs random ones -> <label>_causal_trace.json and figures",
}
DEFAULT_MODELS = {"gpt2": "gpt2", "mamba": "state-spaces/mamba-130m-hf"}
LABEL_PATTERN = re.compile(r"^[a-z0-9_]+$")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python main.py",
        description="Find knowledge neurons (Dai et al. 2022) with integrated gradients in GPT-2 and Mamba (or any "
        "models of the GPT-2, GPT-NeoX/Pythia, Mamba, Mamba-2 and Falcon-Mamba architectures, --models), compare "
        "them across facts, follow state-space models' hidden attention, test them causally and edit knowledge.",
        epilog="modes:\n" + "\n".join(f"  {m:14s} {d}" for m, d in MODES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("mode", nargs="?", default="comprehensive", choices=list(MODES), help="what to run")
    m = p.add_argument_group("models and data")
    m.add_argument("--demo", action="store_true",
                   help="use the offline demo models (tiny models trained on the fact table here, built once and "
                   "cached) instead of gpt2 / state-spaces/mamba-130m-hf, or of the architectures named in --models")
    m.add_argument("--demo-cache", metavar="DIR", help="folder for the demo models (default: $KN_DEMO_CACHE or "
                   "~/.cache/knowledge-neurons/demo)")
    m.add_argument("--models", metavar="LABEL=NAME|PATH,...",
                   help="any number of models side by side, e.g. gpt2=gpt2,pythia=EleutherAI/pythia-160m,"
                   "mamba=state-spaces/mamba-130m-hf; LABEL ([a-z0-9_]+) names the output files "
                   "(<label>_knowledge_neurons.json); architectures: GPT-2, GPT-NeoX (Pythia), Mamba, Mamba-2, "
                   "Falcon-Mamba. With --demo a NAME may be an architecture (gpt2, gpt_neox, mamba, mamba2, "
                   "falcon_mamba) or one of the hub names above: its demo model is used. "
                   "(default: gpt2 and mamba, as --gpt2-model and --mamba-model)")
    m.add_argument("--gpt2-model", metavar="NAME|PATH", help="GPT-2 model: hub name or local folder (default: gpt2)")
    m.add_argument("--mamba-model", metavar="NAME|PATH",
                   help="Mamba model: hub name or local folder (default: state-spaces/mamba-130m-hf)")
    m.add_argument("--facts", metavar="FILE|DIR", help="JSONL fact file, one fact a line: "
                   '{"id", "relation", "subject", "answer", "prompts": [...]}; or a ParaRel folder (the repository, '
                   "its data folder, or graphs_json/ beside trex_lms_vocab/) (default: the built-in table)")
    m.add_argument("--relations", metavar="R1,R2", help="only these relations, e.g. P36,P19 (default: all)")
    m.add_argument("--max-facts-per-relation", type=int, metavar="N",
                   help="at most N facts of each relation: a sample drawn with --seed (default: all)")
    m.add_argument("--max-prompts-per-fact", type=int, metavar="K",
                   help="at most the first K prompts of each fact, K >= 2 (default: all)")
    m.add_argument("--out", metavar="DIR", default="results", help="output folder (default: %(default)s)")
    m.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto = cuda when available)")
    m.add_argument("--allocator", default="retain", choices=ALLOCATORS,
                   help="retain: keep freed memory for reuse (glibc: blocks up to 32 MiB from the heap, up to 2 GiB "
                   "kept free), far fewer page faults on real-sized models; default: the C library's own behaviour, "
                   "which returns memory sooner (default: %(default)s; recorded in the outputs)")
    a = p.add_argument_group("integrated gradients and knowledge neurons")
    a.add_argument("--steps", type=int, default=Options.steps,
                   help="integration steps m (default: %(default)s, as Dai et al.)")
    a.add_argument("--ig-method", default=Options.ig_method, choices=IG_METHODS,
                   help="quadrature rule (default: %(default)s, as Dai et al.)")
    a.add_argument("--baseline", default=Options.baseline, choices=BASELINES,
                   help="IG baseline: zero (Dai et al.), mean (mean activation over the fact prompts), reference "
                   "(activation of --baseline-prompt; Chen et al. 2024) (default: %(default)s)")
    a.add_argument("--baseline-prompt", metavar="TEXT", help="the reference prompt for --baseline reference")
    a.add_argument("--threshold", type=float, default=Options.threshold,
                   help="coarse neurons: score >= THRESHOLD x the prompt's largest score (default: %(default)s)")
    a.add_argument("--share", type=float, default=Options.share,
                   help="refined neurons: coarse in >= SHARE of a fact's prompts, and in >= 2 (default: %(default)s)")
    a.add_argument("--batch-size", type=int, help="rows per pass (one row = prompt x answer token x layer x step; a "
                   "batch's prompts share passes); lower it if memory runs out (default: all rows of a batch at once)")
    a.add_argument("--prompts-per-batch", type=int, metavar="N",
                   help="prompts of several facts attributed together, facts of similar length together, a fact "
                   "never split (default: 32 on a CPU, 4 there for models of over 4096 neurons, 128 on a GPU)")
    s = p.add_argument_group("controls and statistics")
    s.add_argument("--seed", type=int, default=Options.seed,
                   help="seed for random controls, permutations, bootstrap (default: %(default)s)")
    s.add_argument("--random-draws", type=int, default=5,
                   help="random-neuron control sets per fact (interventions) and per edit (editing) (default: 5)")
    s.add_argument("--permutations", type=int, default=1000, help="permutation-test relabellings (default: 1000)")
    s.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples of the facts within each relation (default: 1000)")
    s.add_argument("--pairs-file", action="store_true",
                   help="also write every pair of facts' Jaccard and intersection (all layers and per layer) to "
                        "<out>/<label>_overlap_pairs.jsonl.gz, streamed; the JSON holds the pair table only up to "
                        "300 facts. Grows with the square of the facts")
    s.add_argument("--cross-facts", type=int, default=30, metavar="K",
                   help="comprehensive: each fact's neurons are also suppressed on K other facts of its relation and "
                        "K of other relations (the controls of the causal checks), seeded samples, all when there "
                        "are fewer; keeps the stage linear in the facts (default: %(default)s)")
    s.add_argument("--attention-facts", type=int, default=500, metavar="N",
                   help="attention and comprehensive: token mixing, hidden attention and token flow on a seeded "
                        "sample of N facts, all when there are fewer; maps of the first 30 (default: %(default)s)")
    e = p.add_argument_group("knowledge editing (edit; comprehensive adds it to the report)")
    e.add_argument("--edit-rule", default=EditOptions.rule, choices=RULES,
                   help="dai: v <- v - L1 ||v||/||e(old)|| e(old) + L2 ||v||/||e(new)|| e(new) (Dai et al.); "
                   "eleuther: v <- v - 2 e(old) + 2 e(new) (EleutherAI, EasyEdit) (default: %(default)s)")
    e.add_argument("--edit-lambdas", type=float, nargs=2, metavar=("L1", "L2"),
                   default=(EditOptions.norm_lambda1, EditOptions.norm_lambda2),
                   help="norm_lambda1 / norm_lambda2 of the dai rule (default: 1 8, as Dai et al.)")
    e.add_argument("--erase-top", type=int, default=EditOptions.erase_top, metavar="N",
                   help="erase a relation by zeroing its N most frequent knowledge neurons (default: %(default)s)")
    e.add_argument("--edit-facts", type=int, default=EditOptions.edit_facts, metavar="N",
                   help="facts to update: a seeded sample of N facts, all when there are fewer (default: %(default)s)")
    e.add_argument("--locality-prompts", type=int, default=EditOptions.locality_prompts, metavar="K",
                   help="other facts' prompts each edit's locality (and each erasure's other-relation change) is "
                        "measured on: a seeded sample of K, all when there are fewer (default: %(default)s)")
    e.add_argument("--save-edited", metavar="DIR",
                   help="save_pretrained each model with its first edited fact updated to DIR/<label> "
                   "(with edit_info.json); nothing is saved without it")
    t = p.add_argument_group("causal tracing (trace; comprehensive adds it to the report)")
    t.add_argument("--corruption", default=TraceOptions.corruption, choices=CORRUPTIONS,
                   help="noise: Gaussian noise on the subject's input embeddings (ROME); swap: the subject replaced "
                   "by another subject of its relation with as many tokens (default: %(default)s)")
    t.add_argument("--noise", type=float, metavar="NU",
                   help="noise standard deviation nu (default: 3 x the std of the subjects' token embeddings)")
    t.add_argument("--trace-samples", type=int, default=TraceOptions.samples, metavar="N",
                   help="seeded noise samples per prompt (default: %(default)s, as ROME)")
    t.add_argument("--trace-window", type=int, default=TraceOptions.window, metavar="W",
                   help="layers restored around each layer for the neuron and token-mixing sites "
                   "(default: %(default)s, as ROME)")
    t.add_argument("--trace-facts", type=int, default=500, metavar="N",
                   help="trace a seeded sample of N facts (their first prompt), all when there are fewer "
                        "(default: %(default)s)")
    t.add_argument("--knockout-window", type=int, default=TraceOptions.knockout_window, metavar="W",
                   help="layers around each layer in which the last position is knocked out (default: %(default)s, "
                   "as Geva et al.)")
    r = p.add_argument_group("run control")
    r.add_argument("--save-scores", metavar="{none,fact,prompt}",
                   help="the score file beside each knowledge JSON (one per rank under torchrun): prompt = every "
                   "prompt's (n_layers, width) float32 scores, fact = their mean per fact, both with the completeness "
                   "deltas and coarse neurons; none = no file (default: prompt while all prompts' scores take at most "
                   "2 GiB, else fact)")
    r.add_argument("--fresh", action="store_true",
                   help="recompute every fact instead of resuming from <out>/.kn_cache")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    return p


def parse_models(text: str) -> dict[str, str]:
    """'LABEL=NAME,LABEL=NAME' -> {label: name}, in the order given."""
    models: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        label, sep, name = item.partition("=")
        if not sep or not name.strip():
            raise UserError(f"--models: {item!r} is not LABEL=NAME_OR_PATH")
        if not LABEL_PATTERN.match(label.strip()):
            raise UserError(f"--models: label {label!r} must match [a-z0-9_]+ (it names the output files)")
        if label.strip() in models:
            raise UserError(f"--models: label {label!r} is given twice")
        models[label.strip()] = name.strip()
    if not models:
        raise UserError("--models names no model: give LABEL=NAME_OR_PATH[,LABEL=NAME_OR_PATH...]")
    return models


def model_names(args: argparse.Namespace, facts) -> tuple[dict[str, str], dict[str, str]]:
    """(label -> model name or folder, label -> the architecture that label must have).

    Without --models: GPT-2 and Mamba (labels gpt2 and mamba, each bound to its architecture); explicit options >
    demo models > the hub defaults. With --models: the models given, any supported architecture; under --demo, a
    name that is an architecture or a known hub name stands for that architecture's demo model.
    """
    if args.models is not None:  # an empty --models "" is an error (parse_models), not the default pair
        if args.gpt2_model or args.mamba_model:
            raise UserError("--models replaces --gpt2-model / --mamba-model: name those models in --models")
        names, roles = parse_models(args.models), {}
    else:
        names, roles = dict(DEFAULT_MODELS), {k: k for k in DEFAULT_MODELS}
    if args.demo:
        from models.demo import demo_architecture, ensure_demo_models

        wanted = {label: demo_architecture(name) for label, name in names.items()}
        if args.models is None:  # explicit --gpt2-model / --mamba-model keep their own model
            wanted = {label: arch for label, arch in wanted.items() if not getattr(args, f"{label}_model")}
        folders = ensure_demo_models(facts, args.demo_cache, progress=not args.quiet,
                                     archs=list(dict.fromkeys(a for a in wanted.values() if a)))
        names.update({label: str(folders[arch]) for label, arch in wanted.items() if arch})
    if args.models is None:
        names.update({k: v for k, v in (("gpt2", args.gpt2_model), ("mamba", args.mamba_model)) if v})
    return names, roles


def load_facts_option(args: argparse.Namespace) -> list[Fact]:
    """The built-in table, a JSONL file or a ParaRel folder, then --relations / --max-* selection."""
    if not args.facts:
        facts = list(FACTS)
    elif Path(args.facts).is_dir():
        facts, args.dropped_relations = read_pararel(args.facts)  # stored in the output JSON
    else:
        facts = load_facts(args.facts)
    relations = [r.strip() for r in args.relations.split(",") if r.strip()] if args.relations is not None else None
    return select_facts(facts, relations, args.max_facts_per_relation, args.max_prompts_per_fact, args.seed)


def prepare(args: argparse.Namespace) -> tuple[list[Fact], dict[str, str]]:
    """The up-front checks, the facts and the models (label -> name or folder, demo models built)."""
    from run import preflight

    if args.allocator == "retain":
        retain_freed_memory()

    args.warnings = preflight.check_arguments(args, vars(build_parser().parse_args([])))
    distributed.init(args.device)  # under torchrun: join the other ranks
    torch.manual_seed(args.seed)
    facts = load_facts_option(args)
    preflight.check_demo(args, facts)
    if args.demo and args.models is not None:  # the architectures are known before the demo models are built
        from models.demo import demo_architecture

        preflight.check_mode(args.mode, {k: demo_architecture(v) for k, v in parse_models(args.models).items()})
    with distributed.local_rank_zero_first():  # --demo builds its models once per host
        names, roles = model_names(args, facts)
    preflight.check_models(names, facts, args.baseline_prompt, roles, args)
    return facts, names


def run(args: argparse.Namespace) -> None:
    from run import pipeline

    try:
        facts, names = prepare(args)
    except distributed.RankFailed:
        raise
    except UserError as exc:  # the same input on every rank: under torchrun, rank 0 alone prints it
        raise distributed.SameOnEveryRank(str(exc)) from None
    caveat = pipeline.caveat_of(names)
    if caveat:
        log.info("note: %s; the results show the method at work, not what the real models know", caveat)
    getattr(pipeline, f"run_{args.mode}")(args, facts, names)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.quiet = args.quiet or not distributed.is_main()  # under torchrun only rank 0 shows progress
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        run(args)
    except UserError as exc:
        line = distributed.error_line(exc)  # under torchrun: rank 0 reports an error every rank shares
        if line is not None:
            print(f"error: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished facts are kept in {Path(args.out) / '.kn_cache'}; run again to resume",
              file=sys.stderr)
        return 130
    finally:
        distributed.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
