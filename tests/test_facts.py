"""The built-in fact table and the JSONL loader."""

import dataclasses
import json
import re

import pytest

from common.errors import UserError
from facts import FACTS, Fact, facts_hash, load_facts, relations, validate_facts

GOOD = {"id": "capital_france", "relation": "capital_of", "subject": "France", "answer": "Paris",
        "prompts": ["The capital of France is", "France's capital is"]}


def line(**changes) -> str:
    return json.dumps({**GOOD, **changes})


def write_jsonl(path, facts) -> None:
    rows = [json.dumps({**dataclasses.asdict(f), "prompts": list(f.prompts)}) for f in facts]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


# -----------------------------------------------------------------------------
# the built-in table

def test_builtin_table_validates():
    validate_facts(FACTS)


def test_builtin_table_shape():
    groups = relations(FACTS)
    assert len(groups) >= 6
    for relation, facts in groups.items():
        assert len(facts) >= 4, relation
    assert sum(len(v) for v in groups.values()) == len(FACTS)
    assert len({f.id for f in FACTS}) == len(FACTS)
    for fact in FACTS:
        assert re.fullmatch(r"[a-z0-9_]+", fact.id)
        assert len(fact.prompts) >= 3, fact.id
        assert len(set(fact.prompts)) == len(fact.prompts), fact.id


def test_builtin_prompts_are_cloze():
    for fact in FACTS:
        assert fact.answer == fact.answer.strip()
        for prompt in fact.prompts:
            assert prompt == prompt.rstrip(), prompt
            assert not prompt.endswith("?"), prompt
            assert fact.subject in prompt, (fact.id, prompt)
            assert fact.answer not in prompt, (fact.id, prompt)


def test_builtin_relations_use_parallel_templates():
    for relation, facts in relations(FACTS).items():
        templates = {len(f.prompts) for f in facts}
        assert len(templates) == 1, relation
        for k in range(len(facts[0].prompts)):
            ends = {f.prompts[k].rsplit(" ", 1)[-1] for f in facts}
            assert len(ends) == 1, (relation, k)  # the k-th paraphrase ends the same way for all


@pytest.mark.parametrize("fact_id, answer", [
    ("capital_france", "Paris"), ("capital_germany", "Berlin"), ("capital_italy", "Rome"),
    ("landmark_eiffel_tower", "Paris"),
    ("river_africa", "Nile"), ("river_south_america", "Amazon"), ("river_china", "Yangtze"),
    ("war_end_ww2", "1945"), ("formula_water", "H2O"),
    ("author_romeo_and_juliet", "Shakespeare"), ("author_hamlet", "Shakespeare"),
    ("author_macbeth", "Shakespeare"),
])
def test_seed_facts_present(fact_id, answer):
    by_id = {f.id: f for f in FACTS}
    assert by_id[fact_id].answer == answer


def test_seed_prompt_examples():
    by_id = {f.id: f for f in FACTS}
    assert "The capital of France is" in by_id["capital_france"].prompts
    assert "The longest river in China is the" in by_id["river_china"].prompts
    assert by_id["landmark_eiffel_tower"].relation == "landmark_city"


def test_relations_keep_table_order():
    groups = relations(FACTS)
    assert list(groups) == list(dict.fromkeys(f.relation for f in FACTS))
    for relation, facts in groups.items():
        assert facts == [f for f in FACTS if f.relation == relation]


# -----------------------------------------------------------------------------
# validate_facts on Python lists

def test_validate_names_fact_id():
    bad = dataclasses.replace(FACTS[0], prompts=("Nothing relevant here",))
    with pytest.raises(UserError, match=FACTS[0].id):
        validate_facts([bad])


def test_validate_rejects_duplicate_ids():
    with pytest.raises(UserError, match="duplicate id"):
        validate_facts([FACTS[0], FACTS[0]], source="my list")


def test_validate_rejects_answer_in_prompt_and_leading_space():
    fact = Fact("x", "r", "France", "Paris", ("France is Paris, capital",))
    with pytest.raises(UserError, match="contains the answer"):
        validate_facts([fact])
    with pytest.raises(UserError, match="whitespace"):
        validate_facts([dataclasses.replace(fact, answer=" Paris", prompts=("France is",))])


# -----------------------------------------------------------------------------
# JSONL loader

def test_round_trip(tmp_path):
    path = tmp_path / "facts.jsonl"
    write_jsonl(path, FACTS)
    loaded = load_facts(path)
    assert loaded == list(FACTS)
    assert facts_hash(loaded) == facts_hash(FACTS)


def test_comments_and_blank_lines_skipped(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text(f"# my facts\n\n{line()}\n   \n# end\n", encoding="utf-8")
    (fact,) = load_facts(str(path))
    assert fact == Fact("capital_france", "capital_of", "France", "Paris",
                        ("The capital of France is", "France's capital is"))


def test_single_prompt_allowed(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text(line(prompts=["The capital of France is"]) + "\n", encoding="utf-8")
    assert len(load_facts(path)[0].prompts) == 1


def test_facts_hash():
    h = facts_hash(FACTS)
    assert re.fullmatch(r"[0-9a-f]{16}", h)
    assert facts_hash(FACTS) == h
    assert facts_hash(list(FACTS)) == h
    first = FACTS[0]
    changed = dataclasses.replace(first, prompts=(first.prompts[0] + " indeed", *first.prompts[1:]))
    assert facts_hash((changed, *FACTS[1:])) != h
    assert facts_hash(FACTS[::-1]) != h  # order-sensitive


OTHER = line(id="capital_germany", subject="Germany", answer="Berlin",
             prompts=["The capital of Germany is", "Germany's capital is"])

BAD_FILES = {
    "bad_json": ([line(), OTHER, '{"id": "x", "relation":'], 3, "invalid JSON"),
    "not_object": (["# header", '["a list"]'], 2, "JSON object"),
    "missing_key": ([line(), json.dumps({k: v for k, v in GOOD.items() if k != "answer"})], 2, "missing key"),
    "extra_key": ([json.dumps({**GOOD, "note": "x"})], 1, "unknown key"),
    "duplicate_id": ([line(), "", OTHER, line(prompts=["France's capital city is"])], 4, "duplicate id"),
    "subject_missing": ([OTHER, line(prompts=["The capital of France is", "Its capital is"])], 2,
                        "does not appear in prompt 2"),
    "trailing_space": ([line(prompts=["The capital of France is "])], 1, "ends in whitespace"),
    "prompts_string": (["", "# c", line(prompts="The capital of France is")], 3, "list of strings"),
    "prompts_not_str": ([line(prompts=["The capital of France is", 3])], 1, "list of strings"),
    "no_prompts": ([line(prompts=[])], 1, "at least one prompt"),
    "empty_prompt": ([line(prompts=["The capital of France is", ""])], 1, "prompt 2 is empty"),
    "answer_blank": ([line(answer="   ")], 1, "answer must not be empty"),
    "answer_space": ([line(answer=" Paris")], 1, "whitespace"),
    "answer_in_prompt": ([line(prompts=["France: Paris is the capital, and France's capital is"])], 1,
                         "contains the answer"),
    "id_type": ([line(id=7)], 1, "id must be a string"),
    "id_pattern": ([line(id="Capital-France")], 1, "a-z, 0-9"),
    "empty_subject": ([line(subject="")], 1, "subject must not be empty"),
    "new_answer_type": ([line(new_answer=3)], 1, "new_answer must be a non-empty string"),
    "new_answer_blank": ([line(new_answer=" ")], 1, "new_answer must be a non-empty string"),
    "new_answer_space": ([line(new_answer=" Rome")], 1, "whitespace"),
    "new_answer_same": ([line(new_answer="Paris")], 1, "is the answer itself"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_files(tmp_path, name):
    lines, lineno, needle = BAD_FILES[name]
    path = tmp_path / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_facts(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{lineno}:"), message
    assert needle in message, message
    if name == "duplicate_id":
        assert f"{path}:1" in message.split(":", 2)[2]  # names the earlier line


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(UserError) as info:
        load_facts(path)
    assert str(info.value) == f"{path}: no such file"


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file(tmp_path, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match="no facts"):
        load_facts(path)


def test_invalid_utf8_names_file_line_and_byte(tmp_path):
    path = tmp_path / "latin1.jsonl"
    second = b'{"id": "a", "relation": "r", "subject": "Fran\xe7e", "answer": "Paris", "prompts": ["Fran\xe7e is"]}'
    path.write_bytes(line().encode() + b"\n" + second + b"\n")
    with pytest.raises(UserError) as info:
        load_facts(path)
    column = second.index(b"\xe7") + 1
    assert str(info.value) == f"{path}:2: not valid UTF-8 (byte 0xe7 at byte {column} of the line); save the file " \
        "as UTF-8"


def test_new_answer_is_optional_and_read(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text("\n".join([line(new_answer="Rome"), OTHER, json.dumps({**json.loads(OTHER), "id": "b",
                                                                           "new_answer": None})]) + "\n")
    first, second, third = load_facts(path)
    assert first.new_answer == "Rome"
    assert second.new_answer is None and third.new_answer is None
