"""Facts to look for: a built-in table, a loader for JSONL files, and a selection of facts and prompts.

A fact is a subject, a relation and an answer, asked as several cloze prompts: each prompt ends
exactly where the answer begins, so the model's next token should be the (first token of the)
answer. A facts file holds one JSON object per line (blank lines and lines starting with `#` are
skipped):

    {"id": "capital_france", "relation": "capital_of", "subject": "France", "answer": "Paris",
     "prompts": ["The capital of France is", "France's capital is"]}

Rules: `id` is unique and matches [a-z0-9_]+; `subject` appears verbatim (case-sensitive) in every
prompt; no prompt contains the answer or ends in whitespace; the answer has no leading space (the
space before the answer is added when the answer is tokenized). An optional `"new_answer"` (same rules
as the answer, and different from it) is the answer that `python main.py edit` writes into the model.
"""

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError

KEYS = ("id", "relation", "subject", "answer", "prompts")
OPTIONAL_KEYS = ("new_answer",)
ID_PATTERN = re.compile(r"^[a-z0-9_]+$")


@dataclass(frozen=True)
class Fact:
    id: str  # e.g. "capital_france"
    relation: str  # e.g. "capital_of"
    subject: str  # appears verbatim in every prompt, e.g. "France"
    answer: str  # without leading space, e.g. "Paris"; may be several tokens
    prompts: tuple[str, ...]  # cloze paraphrases, each ending where the answer begins
    new_answer: str | None = None  # the answer a knowledge edit writes in (editing/edits.py); None = chosen there


# -----------------------------------------------------------------------------
# the built-in table: one block per relation, the same paraphrase templates for every fact of it

def _relation(relation: str, templates: Sequence[str], rows: Sequence[tuple]) -> tuple[Fact, ...]:
    """Facts from rows (id, subject, answer[, phrase]); `{}` in a template is the phrase, which
    defaults to the subject (a phrase adds an article: "the Eiffel Tower"). A prompt's first letter
    is capitalized."""
    facts = []
    for fact_id, subject, answer, *phrase in rows:
        text = phrase[0] if phrase else subject
        prompts = tuple(t.format(text) for t in templates)
        prompts = tuple(p[0].upper() + p[1:] for p in prompts)
        facts.append(Fact(fact_id, relation, subject, answer, prompts))
    return tuple(facts)


FACTS: tuple[Fact, ...] = (
    *_relation(
        "capital_of",
        ["The capital of {} is", "The capital city of {} is", "{}'s capital is",
         "The government of {} is based in"],
        [("capital_france", "France", "Paris"),
         ("capital_germany", "Germany", "Berlin"),
         ("capital_italy", "Italy", "Rome"),
         ("capital_japan", "Japan", "Tokyo")],
    ),
    *_relation(
        "landmark_city",
        ["{} is located in the city of", "{} is a famous landmark in", "Tourists travel to see {} in",
         "The city that is home to {} is"],
        [("landmark_eiffel_tower", "Eiffel Tower", "Paris", "the Eiffel Tower"),
         ("landmark_colosseum", "Colosseum", "Rome", "the Colosseum"),
         ("landmark_kremlin", "Kremlin", "Moscow", "the Kremlin"),
         ("landmark_acropolis", "Acropolis", "Athens", "the Acropolis")],
    ),
    *_relation(
        "longest_river",
        ["The longest river in {} is the", "{}'s longest river is the",
         "Of all the rivers in {}, the longest is the", "The longest river flowing through {} is the"],
        [("river_africa", "Africa", "Nile"),
         ("river_south_america", "South America", "Amazon"),
         ("river_china", "China", "Yangtze"),
         ("river_europe", "Europe", "Volga")],
    ),
    *_relation(
        "author_of",
        ["{} was written by", "The author of {} is", "{} is a famous work written by",
         "The writer who created {} is"],
        [("author_romeo_and_juliet", "Romeo and Juliet", "Shakespeare"),
         ("author_hamlet", "Hamlet", "Shakespeare"),
         ("author_macbeth", "Macbeth", "Shakespeare"),
         ("author_don_quixote", "Don Quixote", "Cervantes"),
         ("author_war_and_peace", "War and Peace", "Tolstoy")],
    ),
    *_relation(
        "chemical_formula",
        ["The chemical formula of {} is", "The chemical formula for {} is", "In chemistry, {} is written as",
         "Chemists write the formula of {} as"],
        [("formula_water", "water", "H2O"),
         ("formula_carbon_dioxide", "carbon dioxide", "CO2"),
         ("formula_table_salt", "table salt", "NaCl"),
         ("formula_methane", "methane", "CH4")],
    ),
    *_relation(
        "war_end_year",
        ["{} ended in the year", "Historians agree that {} ended in", "The fighting in {} finally stopped in",
         "{} came to an end in"],
        [("war_end_ww1", "World War I", "1918"),
         ("war_end_ww2", "World War II", "1945"),
         ("war_end_us_civil_war", "American Civil War", "1865", "the American Civil War"),
         ("war_end_vietnam", "Vietnam War", "1975", "the Vietnam War")],
    ),
    *_relation(
        "language_of_country",
        ["The official language of {} is", "Most people in {} speak", "In {}, the main language spoken is",
         "The language spoken in {} is"],
        [("language_france", "France", "French"),
         ("language_spain", "Spain", "Spanish"),
         ("language_japan", "Japan", "Japanese"),
         ("language_brazil", "Brazil", "Portuguese")],
    ),
)


# -----------------------------------------------------------------------------
# checks, shared by the loader and validate_facts

def _problem(fact: Fact) -> str | None:
    """What is wrong with one fact, or None."""
    for name in ("id", "relation", "subject", "answer"):
        value = getattr(fact, name)
        if not isinstance(value, str):
            return f"{name} must be a string, not {type(value).__name__}"
        if not value.strip():
            return f"{name} must not be empty"
    if not ID_PATTERN.match(fact.id):
        return f"id {fact.id!r} must contain only a-z, 0-9 and _"
    if fact.answer != fact.answer.strip():
        return f"answer {fact.answer!r} must not start or end with whitespace (the leading space is added)"
    if fact.new_answer is not None:
        if not isinstance(fact.new_answer, str) or not fact.new_answer.strip():
            return "new_answer must be a non-empty string (or null)"
        if fact.new_answer != fact.new_answer.strip():
            return f"new_answer {fact.new_answer!r} must not start or end with whitespace"
        if fact.new_answer == fact.answer:
            return f"new_answer {fact.new_answer!r} is the answer itself"
    if not isinstance(fact.prompts, tuple) or not all(isinstance(p, str) for p in fact.prompts):
        return "prompts must be a list of strings"
    if not fact.prompts:
        return "prompts must hold at least one prompt"
    for k, prompt in enumerate(fact.prompts, 1):
        if not prompt.strip():
            return f"prompt {k} is empty"
        if prompt != prompt.rstrip():
            return f"prompt {k} {prompt!r} ends in whitespace (the space before the answer is added)"
        if fact.subject not in prompt:
            return f"subject {fact.subject!r} does not appear in prompt {k} {prompt!r}"
        if answer_in_prompt(prompt, fact.subject, fact.answer):
            return f"prompt {k} {prompt!r} already contains the answer {fact.answer!r} (outside the subject, or " \
                   "as a word of it)"
        if prompt in fact.prompts[: k - 1]:
            return f"prompt {k} {prompt!r} repeats an earlier prompt"
    return None


def answer_in_prompt(prompt: str, subject: str, answer: str) -> bool:
    """Whether the prompt gives the answer away: it holds the answer outside the subject, or as a whole word
    (e.g. Cora Vale -> Vale). An answer inside a word of the subject (Germany -> German) does not count."""
    if answer in prompt.replace(subject, "\0"):
        return True
    return re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", prompt) is not None


def _check(fact: Fact, where: str, seen: dict[str, str]) -> None:
    """Raise UserError(f"{where}: ...") if the fact is bad or its id is in `seen`; then record it."""
    problem = _problem(fact)
    if problem is None and fact.id in seen:
        problem = f"duplicate id {fact.id!r} (first defined at {seen[fact.id]})"
    if problem is not None:
        raise UserError(f"{where}: {problem}")
    seen[fact.id] = where


def validate_facts(facts: Sequence[Fact], source: str = "built-in fact table") -> None:
    """Raise UserError naming the first bad fact (and its id) in `facts`."""
    seen: dict[str, str] = {}
    for i, fact in enumerate(facts, 1):
        _check(fact, f"{source}, fact {i} ({fact.id!r})", seen)


# -----------------------------------------------------------------------------
# JSONL files

def _fact(obj: dict) -> Fact:
    """One JSONL object -> Fact; raises ValueError saying what is wrong with its shape."""
    missing = [k for k in KEYS if k not in obj]
    if missing:
        raise ValueError(f"missing key(s): {', '.join(missing)}")
    extra = [k for k in obj if k not in KEYS + OPTIONAL_KEYS]
    if extra:
        raise ValueError(f"unknown key(s): {', '.join(extra)} (allowed: {', '.join(KEYS + OPTIONAL_KEYS)})")
    prompts = obj["prompts"]
    if isinstance(prompts, list):
        prompts = tuple(prompts)  # anything else is reported by _problem
    return Fact(obj["id"], obj["relation"], obj["subject"], obj["answer"], prompts, obj.get("new_answer"))


def _read_utf8(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 raise UserError("path:line: ...") naming line and column."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        offset = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise UserError(
            f"{path}:{lineno}: not valid UTF-8 (byte 0x{data[e.start]:02x} at byte {offset} of the line); "
            "save the file as UTF-8"
        ) from None


def read_jsonl(path: Path, comments: bool = False) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a UTF-8 JSONL file (and, with `comments`, every line not
    starting with `#`); bytes that are not UTF-8, invalid JSON and non-objects raise UserError("path:line: ...")."""
    for lineno, line in enumerate(_read_utf8(path).splitlines(), 1):
        if not line.strip() or (comments and line.lstrip().startswith("#")):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object")
        yield lineno, obj


def load_facts(path: str | Path) -> list[Fact]:
    """Read and check a JSONL facts file; any problem raises UserError("path:line: ...")."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    facts: list[Fact] = []
    seen: dict[str, str] = {}
    for lineno, obj in read_jsonl(path, comments=True):
        where = f"{path}:{lineno}"
        try:
            fact = _fact(obj)
        except ValueError as e:
            raise UserError(f"{where}: {e}") from None
        _check(fact, where, seen)
        facts.append(fact)
    if not facts:
        raise UserError(f"{path}: no facts (the file is empty or holds only comments)")
    return facts


# -----------------------------------------------------------------------------
# helpers

def facts_hash(facts: Sequence[Fact]) -> str:
    """First 16 hex digits of the sha256 of a canonical JSON of the facts (order matters)."""
    rows = [{"id": f.id, "relation": f.relation, "subject": f.subject, "answer": f.answer,
             "prompts": list(f.prompts)} for f in facts]
    text = json.dumps(rows, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def relations(facts: Sequence[Fact]) -> dict[str, list[Fact]]:
    """relation -> its facts, relations and facts in table order."""
    groups: dict[str, list[Fact]] = {}
    for fact in facts:
        groups.setdefault(fact.relation, []).append(fact)
    return groups


def _draw_key(seed: int, fact: Fact) -> str:
    """A fact's place in the seeded sample: a hash of the seed and its id, so the input order does not matter."""
    return hashlib.sha256(f"{seed}:{fact.id}".encode()).hexdigest()


def select_facts(
    facts: Sequence[Fact],
    relations: Sequence[str] | None = None,
    max_facts_per_relation: int | None = None,
    max_prompts_per_fact: int | None = None,
    seed: int = 0,
) -> list[Fact]:
    """The facts of `relations` (all when None), at most `max_facts_per_relation` of each relation (a seeded
    sample, the same whatever the order of `facts`), each with at most its first `max_prompts_per_fact`
    prompts (every fact of a relation keeps the same paraphrases). Facts stay in their input order."""
    available = list(dict.fromkeys(f.relation for f in facts))
    if relations is not None:
        unknown = [r for r in relations if r not in available]
        if unknown or not relations:
            what = f"unknown relation(s) {', '.join(unknown)}" if unknown else "no relation given"
            raise UserError(f"--relations: {what}; available: {', '.join(available)}")
        wanted = set(relations)
        facts = [f for f in facts if f.relation in wanted]
    if max_facts_per_relation is not None:
        if max_facts_per_relation < 1:
            raise UserError("--max-facts-per-relation must be at least 1")
        groups: dict[str, list[Fact]] = {}
        for fact in sorted(facts, key=lambda f: _draw_key(seed, f)):
            groups.setdefault(fact.relation, []).append(fact)
        chosen = {f.id for group in groups.values() for f in group[:max_facts_per_relation]}
        facts = [f for f in facts if f.id in chosen]
    if max_prompts_per_fact is not None:
        if max_prompts_per_fact < 2:
            raise UserError("--max-prompts-per-fact must be at least 2 (a refined neuron needs 2 prompts)")
        facts = [dataclasses.replace(f, prompts=f.prompts[:max_prompts_per_fact]) for f in facts]
    return list(facts)
