"""The three modes of `main.py`, as sequences of calls into the analysis modules."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from analysis import ModelResult, Options, find_knowledge_neurons, knowledge_tables, write_knowledge
from errors import UserError
from facts import Fact
from knowledge_neurons import KnowledgeNeurons
from models import load_model

log = logging.getLogger(__name__)

LABELS = {"gpt2": "GPT-2", "mamba": "Mamba"}


def options_from(args: argparse.Namespace) -> Options:
    return Options(
        steps=args.steps, ig_method=args.ig_method, threshold=args.threshold, share=args.share,
        batch_size=args.batch_size, baseline=args.baseline, baseline_prompt=args.baseline_prompt, seed=args.seed,
    )


def knowledge_stage(
    args: argparse.Namespace, facts: Sequence[Fact], names: dict[str, str], archs: Sequence[str]
) -> dict[str, tuple[ModelResult, KnowledgeNeurons]]:
    """Knowledge neurons of each architecture's model; writes <arch>_knowledge_neurons.json/.npz to --out."""
    options = options_from(args)
    out = Path(args.out)
    done = {}
    for arch in archs:
        model, tokenizer = load_model(names[arch], args.device)
        if model.config.model_type != arch:
            raise UserError(f"--{arch}-model {names[arch]} is a '{model.config.model_type}' model, not {arch}")
        kn = KnowledgeNeurons(model, tokenizer)
        result = find_knowledge_neurons(
            kn, facts, options, names[arch], out / ".kn_cache", resume=not args.fresh, progress=not args.quiet
        )
        write_knowledge(result, tokenizer, out, f"{arch}_knowledge_neurons")
        log.info("wrote %s", out / f"{arch}_knowledge_neurons.json")
        done[arch] = (result, kn)
    return done


def run_knowledge(args: argparse.Namespace, facts: Sequence[Fact], names: dict[str, str]) -> None:
    done = knowledge_stage(args, facts, names, ("gpt2", "mamba"))
    print(knowledge_tables({LABELS[a]: r for a, (r, _) in done.items()}))
