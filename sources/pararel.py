"""ParaRel (Elazar et al. 2021) as a fact source, read from the user's copy of github.com/yanaiela/pararel.

Its layout (the tool accepts the repository root, its `data` folder, or a folder holding `graphs_json/` and
`trex_lms_vocab/` side by side):

    data/pattern_data/graphs_json/P36.jsonl   {"pattern": "The capital of [X] is [Y] .", "lemma": ..., ...}
    data/trex_lms_vocab/P36.jsonl             {"sub_label": "France", "obj_label": "Paris", "uuid": "...", ...}

A causal LM reads left to right, so a pattern is usable only when [Y] ends it (trailing spaces and final
punctuation such as " ." are dropped) and a space comes before [Y]; [X] is filled with the subject and the
prompt ends where the answer begins. Each relation's facts become `facts.Fact`s with relation = the
relation id ("P36") and id = "p36_" + the fact's uuid (or its line number); a fact keeps the distinct prompts
that do not give its answer away (`facts.answer_in_prompt`: the answer outside the subject or as a word of it;
Germany -> German is kept) and is skipped when fewer than 2 remain (refined neurons need 2).

A relation that ends with no fact (no usable pattern, no fact with 2 usable prompts, a pattern or fact file
missing) is dropped with a warning; `read_pararel` returns the dropped relations with the reason.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from common.errors import UserError
from facts import Fact, answer_in_prompt, read_jsonl, validate_facts

log = logging.getLogger(__name__)

# (patterns folder, facts folder) relative to the three accepted roots
LAYOUTS = (
    ("data/pattern_data/graphs_json", "data/trex_lms_vocab"),  # the repository root
    ("pattern_data/graphs_json", "trex_lms_vocab"),  # its data folder
    ("graphs_json", "trex_lms_vocab"),  # the two folders side by side
)
FINAL_PUNCTUATION = " \t.!?,;:"
MIN_PROMPTS = 2


def _folders(root: Path) -> tuple[Path, Path]:
    """The patterns folder and the facts folder under `root`."""
    if not root.is_dir():
        raise UserError(f"{root}: no such folder")
    for patterns, facts in LAYOUTS:
        if (root / patterns).is_dir() and (root / facts).is_dir():
            return root / patterns, root / facts
    expected = "; ".join(f"{p}/ and {f}/" for p, f in LAYOUTS)
    raise UserError(f"{root}: not a ParaRel folder; expected one of: {expected}")


def _text(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: {key!r} must be a non-empty string")
    return value.strip()


def template(pattern: str) -> str | None:
    """The prompt of a pattern with [X] still in it ("The capital of [X] is"), or None if a causal LM cannot
    be asked it: [Y] must end the pattern once trailing spaces and final punctuation are dropped, follow a
    space, and occur once; [X] must come before it."""
    text = pattern.rstrip(FINAL_PUNCTUATION)
    if not text.endswith("[Y]") or text.count("[Y]") != 1:
        return None
    before = text[: -len("[Y]")]
    if not before[-1:].isspace() or "[X]" not in before:
        return None
    return before.rstrip()


def _relation_facts(relation: str, templates: list[str], path: Path) -> tuple[list[Fact], int, int]:
    """The usable facts of one relation, how many facts were skipped (< 2 usable prompts) and how many prompts
    were dropped because they give the answer away."""
    facts, skipped, leaks, seen = [], 0, 0, {}
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        subject, answer = _text(obj, "sub_label", where), _text(obj, "obj_label", where)
        uuid = obj.get("uuid")
        suffix = re.sub(r"[^a-z0-9]+", "_", uuid.lower()).strip("_") if isinstance(uuid, str) else ""
        fact_id = f"{relation.lower()}_{suffix or f'line{lineno}'}"
        if fact_id in seen:
            raise UserError(f"{where}: fact id {fact_id!r} repeats line {seen[fact_id]} (uuids must be unique)")
        seen[fact_id] = lineno
        prompts = dict.fromkeys(t.replace("[X]", subject) for t in templates)  # distinct, in pattern order
        kept = tuple(p for p in prompts if not answer_in_prompt(p, subject, answer))
        leaks += len(prompts) - len(kept)
        prompts = kept
        if len(prompts) < MIN_PROMPTS:
            skipped += 1
            continue
        facts.append(Fact(fact_id, relation, subject, answer, prompts))
    return facts, skipped, leaks


def _relation_key(name: str) -> tuple:
    """P19 before P101: the number, then the name."""
    digits = re.sub(r"\D", "", name)
    return (int(digits) if digits else float("inf"), name)


def load_pararel(path: str | Path) -> list[Fact]:
    """Facts of every relation that has both a pattern file and a fact file, relations in id order."""
    return read_pararel(path)[0]


def _dropped(reason: str, name: str, dropped: dict[str, str]) -> None:
    dropped[name] = reason
    log.warning("warning: ParaRel %s dropped: %s", name, reason)


def read_pararel(path: str | Path) -> tuple[list[Fact], dict[str, str]]:
    """(the facts of `load_pararel`, relation -> why it was dropped, for each relation that gave no fact)."""
    root = Path(path).expanduser()
    pattern_dir, fact_dir = _folders(root)
    pattern_files = {p.stem: p for p in pattern_dir.glob("*.jsonl")}
    fact_files = {p.stem: p for p in fact_dir.glob("*.jsonl")}
    names = sorted(pattern_files.keys() & fact_files.keys(), key=_relation_key)
    if not names:
        raise UserError(f"{root}: no relation has both {pattern_dir}/<relation>.jsonl and {fact_dir}/<relation>.jsonl")
    dropped: dict[str, str] = {}
    for name in sorted(pattern_files.keys() ^ fact_files.keys(), key=_relation_key):
        _dropped("no fact file" if name in pattern_files else "no pattern file", name, dropped)
    facts: list[Fact] = []
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise UserError(f"{pattern_files[name]}: relation id {name!r} must contain only letters, digits and _")
        file = pattern_files[name]
        patterns = [_text(obj, "pattern", f"{file}:{lineno}") for lineno, obj in read_jsonl(file)]
        templates = [t for p in patterns if (t := template(p)) is not None]
        kept, skipped, leaks = _relation_facts(name, templates, fact_files[name])
        log.info("ParaRel %s: %d of %d patterns usable; %d facts, %d skipped (fewer than %d usable prompts); "
                 "%d prompts dropped as they give the answer away", name, len(templates), len(patterns), len(kept),
                 skipped, MIN_PROMPTS, leaks)
        if not patterns:
            _dropped(f"{file} holds no pattern", name, dropped)
        elif not templates:
            _dropped(f"none of its {len(patterns)} patterns is usable ([Y] must end the pattern, after a space, "
                     "with [X] before it)", name, dropped)
        elif not kept:
            _dropped(f"none of its {skipped} facts has {MIN_PROMPTS} usable prompts ({len(templates)} usable "
                     f"patterns; {leaks} prompts give the answer away)", name, dropped)
        facts.extend(kept)
    if not facts:
        raise UserError(f"{root}: no ParaRel fact has {MIN_PROMPTS} usable prompts")
    validate_facts(facts, source=str(root))
    log.info("ParaRel: %d facts in %d relations, %d prompts", len(facts), len({f.relation for f in facts}),
             sum(len(f.prompts) for f in facts))
    return facts, dropped
