"""Checks of the whole command line before any work is spent: an input that is wrong from the start stops the
run here with one line (a `UserError`), not after a stage has been computed and written.

`check_arguments` runs first (options, device, output folder: cheap, before any demo model is trained);
`check_models` once the model names are known (each model's architecture against the role it is used for,
and every fact's tokens against the model's context, from its config and tokenizer, without the weights).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from common.errors import UserError
from common.tokens import encode, encode_prompt
from facts import Fact
from models import ADAPTERS, load_config, load_tokenizer, resolve_device


def check_out_dir(out: str | Path) -> Path:
    """The output folder exists (created if needed) and a file can be written in it."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {out}: this is an existing file, not a folder; pass a folder for the results")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create or write to this folder ({exc.strerror or exc})") from None
    return path


def check_arguments(args: argparse.Namespace) -> None:
    """Options, device and output folder."""
    from run.pipeline import options_from  # builds (and so checks) the analysis options

    options_from(args)
    resolve_device(args.device)
    check_out_dir(args.out)


def check_context(option: str, name: str, limit: int, tokenizer, facts: Sequence[Fact],
                  baseline_prompt: str | None = None) -> None:
    """Every fact prompt, with its answer tokens as teacher forcing feeds them, fits in `limit` positions."""
    for fact in facts:
        for k, prompt in enumerate(fact.prompts, 1):
            prompt_ids, answer_ids = encode(tokenizer, prompt, fact.answer, f"fact {fact.id}")
            needed = len(prompt_ids) + len(answer_ids) - 1  # the last answer token is predicted, never read
            if needed > limit:
                raise UserError(
                    f"fact {fact.id}, prompt {k}: {len(prompt_ids)} prompt + {len(answer_ids)} answer tokens "
                    f"need {needed} positions, more than the {limit} of {option} {name}; shorten the prompt"
                )
    if baseline_prompt is not None and len(encode_prompt(tokenizer, baseline_prompt, "--baseline-prompt")) > limit:
        raise UserError(f"--baseline-prompt is longer than the {limit} positions of {option} {name}")


def check_models(names: Mapping[str, str], facts: Sequence[Fact], baseline_prompt: str | None = None,
                 roles: Mapping[str, str] | None = None) -> None:
    """names: label -> model name or folder; roles: label -> the architecture that label's model must have
    (--gpt2-model must be a GPT-2); labels without a role may be any supported architecture (--models).

    Reads each model's config (and, where the model has a context limit, its tokenizer), never the weights.
    """
    roles = roles or {}
    for label, name in names.items():
        option = f"--{label}-model" if label in roles else f"--models {label}="
        config = load_config(name)
        if label in roles and config.model_type != roles[label]:
            raise UserError(f"{option} {name} is a '{config.model_type}' model, not {roles[label]}")
        if config.model_type not in ADAPTERS:
            raise UserError(f"{option} {name} is a '{config.model_type}' model; "
                            f"supported: {', '.join(ADAPTERS)}")
        limit = ADAPTERS[config.model_type].max_positions(config)
        if limit is not None:
            check_context(option, name, limit, load_tokenizer(name), facts, baseline_prompt)
