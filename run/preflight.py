"""Checks of the whole command line before any work is spent: an input that is wrong from the start stops the
run here with one line (a `UserError`), not after a stage has been computed and written.

`check_arguments` runs first (the range of every option from one table, `RANGES`; options the mode ignores;
device, output folders: cheap, before any demo model is trained); `check_mode` as soon as the architectures are
known; `check_models` once the model names are known (each model's architecture against the role it is used
for, every fact's tokens against the model's context, --save-edited: from config and tokenizer, no weights).
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from analysis.scores import SAVE_SCORES
from common.errors import UserError
from common.tokens import encode, encode_prompt
from editing.edits import new_answers
from facts import Fact
from models import ADAPTERS, SSMAdapter, load_config, load_tokenizer, resolve_device
from run import distributed

log = logging.getLogger(__name__)

EDITING = ("comprehensive", "edit")  # the modes that run the editing stage
TRACING = ("comprehensive", "trace")  # the modes that run the causal-tracing stage


def _warn(message: str, *args: Any) -> None:
    """A warning about the input, which every rank finds alike: under torchrun, rank 0 alone logs it."""
    if distributed.is_main():
        log.warning("warning: " + message, *args)


def _given(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """`test` for an option that may be left out (None: its default, e.g. all facts)."""
    return lambda v: v is None or test(v)


# option (its argparse dest) -> (test of its value, what a valid value is). Every range of the command line is
# here, so that a bad value stops the run before any model is loaded, not after a stage has been computed.
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "steps": (lambda v: v >= 1, "an integer >= 1"),
    "threshold": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "share": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "batch_size": (_given(lambda v: v >= 1), "an integer >= 1"),
    "prompts_per_batch": (_given(lambda v: v >= 1), "an integer >= 1"),
    "max_facts_per_relation": (_given(lambda v: v >= 1), "an integer >= 1"),
    "max_prompts_per_fact": (_given(lambda v: v >= 2), "an integer >= 2 (a refined neuron needs 2 prompts)"),
    "seed": (lambda v: 0 <= v < 2**32, "an integer in [0, 2^32)"),
    "random_draws": (lambda v: v >= 1, "an integer >= 1"),
    "permutations": (lambda v: v >= 1, "an integer >= 1"),
    "bootstrap": (lambda v: v >= 1, "an integer >= 1"),
    "erase_top": (lambda v: v >= 1, "an integer >= 1"),
    "edit_facts": (_given(lambda v: v >= 1), "an integer >= 1 (a sample size; a large number for all facts)"),
    "locality_prompts": (_given(lambda v: v >= 1), "an integer >= 1 (a sample size; a large number for all prompts)"),
    "attention_facts": (lambda v: v >= 1, "an integer >= 1 (a sample size; a large number for all facts)"),
    "cross_facts": (lambda v: v >= 1, "an integer >= 1 (a sample size; a large number for all facts)"),
    "trace_facts": (lambda v: v >= 1, "an integer >= 1 (a sample size; a large number for all facts)"),
    "edit_lambdas": (lambda v: all(math.isfinite(x) and x >= 0 for x in v),
                     "two finite numbers >= 0 (a negative lambda inverts the edit)"),
    "noise": (_given(lambda v: 0 < v < math.inf), "a finite number > 0"),
    "trace_samples": (lambda v: v >= 1, "an integer >= 1"),
    "trace_window": (lambda v: v >= 1, "an integer >= 1"),
    "knockout_window": (lambda v: v >= 1, "an integer >= 1"),
    "save_scores": (_given(lambda v: v in SAVE_SCORES), f"one of {', '.join(SAVE_SCORES)}"),
}

# option -> the modes that use it; another mode ignores it, and says so when it was given
USED_IN: dict[str, tuple[str, ...]] = {
    "random_draws": (*EDITING, "trace"), "permutations": ("comprehensive",), "bootstrap": ("comprehensive", "trace"),
    "edit_rule": EDITING, "edit_lambdas": EDITING, "erase_top": EDITING, "save_edited": EDITING,
    "edit_facts": EDITING, "locality_prompts": EDITING, "attention_facts": ("attention", "comprehensive"),
    "cross_facts": ("comprehensive",),
    **{dest: TRACING for dest in ("corruption", "noise", "trace_samples", "trace_window", "trace_facts",
                                  "knockout_window")},
}


def option_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _shown(value: Any) -> str:
    return " ".join(f"{v:g}" for v in value) if isinstance(value, (list, tuple)) else str(value)


def check_ranges(args: argparse.Namespace) -> None:
    """Every option of `RANGES` against its range: the first bad one raises UserError."""
    for dest, (test, what) in RANGES.items():
        value = getattr(args, dest)
        if not test(value):
            raise UserError(f"{option_name(dest)} {_shown(value)}: must be {what}")


def ignored_options(args: argparse.Namespace, defaults: Mapping[str, Any]) -> list[str]:
    """What the run will ignore of what was given: options the mode does not use, the lambdas of the fixed
    eleuther rule. One sentence each (logged as warnings and stored in the output JSON)."""
    notes = [f"{option_name(dest)} {_shown(getattr(args, dest))} is ignored: {args.mode} mode does not use it "
             f"(used in {' and '.join(modes)} mode)"
             for dest, modes in USED_IN.items()
             if args.mode not in modes and getattr(args, dest) != defaults.get(dest)]
    if args.mode in EDITING and args.edit_rule == "eleuther" and tuple(args.edit_lambdas) != tuple(
            defaults.get("edit_lambdas", args.edit_lambdas)):
        notes.append(f"--edit-lambdas {_shown(args.edit_lambdas)} is ignored: the eleuther rule has fixed weights "
                     "(v <- v - 2 e(old) + 2 e(new)); the lambdas apply to --edit-rule dai only")
    return notes


def check_out_dir(out: str | Path, option: str = "--out") -> Path:
    """The output folder exists (created if needed) and a file can be written in it."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {out}: this is an existing file, not a folder; pass a folder for the results")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UserError(f"{option} {out}: cannot create or write to this folder ({exc.strerror or exc})") from None
    return path


def check_arguments(args: argparse.Namespace, defaults: Mapping[str, Any] | None = None) -> list[str]:
    """Option ranges, device and output folders; returns the warnings about ignored options (see
    `ignored_options`; `defaults`: the parser's default of each option; none without it), each logged."""
    from run.pipeline import options_from  # builds (and so checks) the analysis options

    check_ranges(args)
    options_from(args)
    check_trace_options(args)
    resolve_device(args.device)
    check_out_dir(args.out)
    notes = ignored_options(args, defaults) if defaults is not None else []
    if args.save_edited and args.mode in EDITING:
        check_out_dir(args.save_edited, "--save-edited")
    for note in notes:
        _warn("%s", note)
    return notes


def is_state_space(architecture: str) -> bool:
    return issubclass(ADAPTERS[architecture], SSMAdapter)


def check_mode(mode: str, architectures: Mapping[str, str | None]) -> None:
    """The models suit the mode: attention mode needs a state-space model. architectures: label -> model_type,
    None where not known yet (nothing is refused on its account)."""
    known = [a for a in architectures.values() if a in ADAPTERS]
    if mode == "attention" and len(known) == len(architectures) and not any(map(is_state_space, known)):
        raise UserError(f"attention mode needs a state-space model (Mamba, Mamba-2, Falcon-Mamba) among the models; "
                        f"these are {', '.join(f'{k}: {a}' for k, a in architectures.items())}")


def check_save_edited(folder: str | Path, names: Mapping[str, str], facts: Sequence[Fact]) -> None:
    """--save-edited DIR: DIR/<label> must not be a file; a model already there is replaced (a warning); and at
    least one fact must have a new answer for every model, or nothing could be saved."""
    for label, name in names.items():
        target = Path(folder) / label
        if target.exists() and not target.is_dir():
            raise UserError(f"--save-edited {folder}: {target} is an existing file, not a folder for the edited "
                            f"model of {label}")
        if (target / "config.json").is_file():
            _warn("--save-edited: %s already holds a model; it will be replaced by the edited %s", target, label)
        if not any(new_answers(facts, load_tokenizer(name)).values()):
            raise UserError("--save-edited: no fact has a new answer to be edited to (a fact needs a new_answer in "
                            "the facts file, or another fact of its relation whose answer starts with another "
                            "token), so no edited model could be saved")


def check_demo(args: argparse.Namespace, facts: Sequence[Fact]) -> None:
    """--demo trains its models on the facts themselves: only on a table of the size the demo models are made for."""
    from models.demo import DEMO_MAX_FACTS

    if args.demo and len(facts) > DEMO_MAX_FACTS:
        raise UserError(f"--demo trains tiny models on the facts themselves, made for up to {DEMO_MAX_FACTS} facts; "
                        f"these are {len(facts)} (training would be long and miss the accuracy check). Select fewer "
                        "(--relations, --max-facts-per-relation) or pass real models (--gpt2-model, --mamba-model, "
                        "--models)")


def check_trace_options(args: argparse.Namespace) -> None:
    """What `RANGES` cannot say of the causal-tracing options: --noise belongs to --corruption noise."""
    if args.noise is not None and args.corruption == "swap":
        raise UserError("--noise sets the noise of --corruption noise; it has no meaning with --corruption swap")


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
                 roles: Mapping[str, str] | None = None, args: argparse.Namespace | None = None) -> None:
    """names: label -> model name or folder; roles: label -> the architecture that label's model must have
    (--gpt2-model must be a GPT-2); labels without a role may be any supported architecture (--models).

    Reads each model's config (and, where the model has a context limit, its tokenizer), never the weights.
    `args` (the command line): the mode's needs (`check_mode`) and --save-edited are checked too.
    """
    roles = roles or {}
    architectures = {}
    for label, name in names.items():
        option = f"--{label}-model" if label in roles else f"--models {label}="
        config = load_config(name)
        if label in roles and config.model_type != roles[label]:
            raise UserError(f"{option} {name} is a '{config.model_type}' model, not {roles[label]}")
        if config.model_type not in ADAPTERS:
            raise UserError(f"{option} {name} is a '{config.model_type}' model; "
                            f"supported: {', '.join(ADAPTERS)}")
        architectures[label] = config.model_type
        limit = ADAPTERS[config.model_type].max_positions(config)
        if limit is not None:
            check_context(option, name, limit, load_tokenizer(name), facts, baseline_prompt)
    if args is not None:
        check_mode(args.mode, architectures)
        if args.save_edited and args.mode in EDITING:
            check_save_edited(args.save_edited, names, facts)
