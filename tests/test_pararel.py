"""The ParaRel reader on invented fixtures in ParaRel's layout, and the selection of facts and prompts."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from common.errors import UserError
from facts import FACTS, Fact, answer_in_prompt, relations, select_facts, validate_facts
from main import build_parser, load_facts_option, main
from sources.pararel import load_pararel, read_pararel, template

FIXTURE = Path(__file__).parent / "fixtures" / "pararel"
DATA = FIXTURE / "data"


def _by_id(facts: list[Fact]) -> dict[str, Fact]:
    return {f.id: f for f in facts}


def _copy(tmp_path: Path) -> Path:
    """A writable copy of the fixture's data folder."""
    return Path(shutil.copytree(DATA, tmp_path / "data"))


# -----------------------------------------------------------------------------
# patterns

@pytest.mark.parametrize("pattern, expected", [
    ("The capital of [X] is [Y] .", "The capital of [X] is"),
    ("The capital of [X] is [Y].", "The capital of [X] is"),
    ("[X] has its government in [Y]   ", "[X] has its government in"),
    ("Which city is the capital of [X]? [Y]", "Which city is the capital of [X]?"),
    ("[X] [Y] !", "[X]"),
    ("[Y] is the capital of [X] .", None),  # [Y] first
    ("The capital of [X] , [Y] , is busy .", None),  # [Y] in the middle
    ("[X] was born in:[Y]", None),  # no space before [Y]: the answer would not start where the prompt ends
    ("The capital is [Y] .", None),  # no [X]
    ("[X] is [Y] or [Y] .", None),  # [Y] twice
    ("[X] is [Y] (city) .", None),
])
def test_pattern_rules(pattern, expected):
    assert template(pattern) == expected


# -----------------------------------------------------------------------------
# the reader

def test_reads_the_fixture_with_every_skip_rule(caplog):
    with caplog.at_level(logging.INFO, logger="sources.pararel"):
        facts = load_pararel(FIXTURE)
    validate_facts(facts)
    assert [f.relation for f in facts] == ["P19"] * 3 + ["P36"] * 6  # relations by number, facts in file order
    by_id = _by_id(facts)
    freedonia = by_id["p36_3f5a9c1e_0b7d_4c2a_9e11_5d6f7a8b9c01"]
    assert freedonia.subject == "Freedonia" and freedonia.answer == "Fredville"
    # usable patterns 1, 2, 5, 6 of P36, in file order; "[Y] is ...", "[X] , [Y] , ..." skipped
    assert freedonia.prompts == ("The capital of Freedonia is", "Freedonia's capital city is",
                                 "Freedonia has its government in", "Which city is the capital of Freedonia?")
    assert by_id["p36_line3"].subject == "Latveria"  # no uuid: the line number
    assert by_id["p36_c1d2e3f4_a5b6_4c7d_8e9f_0a1b2c3d4e05"].subject == "Genovia"  # labels are stripped
    assert by_id["p36_d4e5f6a7_b8c9_4d0e_9f1a_2b3c4d5e6f06"].answer == "Mud Flats"
    # the P19 duplicate pattern gives one prompt; the prompt holding the answer "Kent" is dropped
    aldo = by_id["p19_5f0c6a1e_2d3b_4c4a_8b5e_6f7a8b9c0d11"]
    assert aldo.prompts == ("Aldo Fenwick was born in", "The hometown of Aldo Fenwick is",
                            "Aldo Fenwick , raised in Kent , is a native of")
    assert by_id["p19_6a1d7b2f_3e4c_4d5b_9c6f_7a8b9c0d1e12"].prompts == ("Bea Tarrant was born in",
                                                                        "The hometown of Bea Tarrant is")
    # the answer as a word of the subject (Cora Vale / Vale) gives it away: no usable prompt, skipped; inside a
    # word of the subject (Sylvania / Sylvan, as Germany / German) it does not: the fact is kept
    assert "Cora Vale" not in {f.subject for f in facts}
    assert _by_id(facts)["p36_a9c8e7f6_5d4c_4b3a_9f8e_7d6c5b4a3f04"].prompts[0] == "The capital of Sylvania is"
    assert "ParaRel P36: 4 of 6 patterns usable; 6 facts, 0 skipped" in caplog.text
    assert "ParaRel P19: 4 of 7 patterns usable; 3 facts, 1 skipped (fewer than 2 usable prompts); 4 prompts " \
           "dropped as they give the answer away" in caplog.text  # Cora Vale's 3, the "raised in Kent" one
    assert "ParaRel P101: 0 of 2 patterns usable; 0 facts, 2 skipped" in caplog.text
    assert "ParaRel P20 dropped: no fact file" in caplog.text and "ParaRel P27 dropped: no pattern file" in caplog.text
    assert "9 facts in 2 relations, 32 prompts" in caplog.text


def test_three_layouts_give_the_same_facts(tmp_path):
    flat = tmp_path / "flat"
    shutil.copytree(DATA / "pattern_data" / "graphs_json", flat / "graphs_json")
    shutil.copytree(DATA / "trex_lms_vocab", flat / "trex_lms_vocab")
    expected = load_pararel(FIXTURE)
    assert load_pararel(DATA) == expected
    assert load_pararel(flat) == expected


def test_not_a_pararel_folder(tmp_path):
    with pytest.raises(UserError, match=r"not a ParaRel folder.*graphs_json"):
        load_pararel(tmp_path)
    with pytest.raises(UserError, match="no such folder"):
        load_pararel(tmp_path / "missing")


@pytest.mark.parametrize("file, line, message", [
    ("trex_lms_vocab/P36.jsonl", "{oops", "invalid JSON"),
    ("trex_lms_vocab/P36.jsonl", '{"obj_label": "Paris"}', "'sub_label' must be a non-empty string"),
    ("trex_lms_vocab/P36.jsonl", '{"sub_label": "France", "obj_label": " "}', "'obj_label' must be a non-empty"),
    ("trex_lms_vocab/P36.jsonl", '["France", "Paris"]', "expected a JSON object"),
    ("trex_lms_vocab/P36.jsonl",
     '{"sub_label": "Oz", "obj_label": "Emerald", "uuid": "3f5a9c1e-0b7d-4c2a-9e11-5d6f7a8b9c01"}',
     "repeats line 1"),
    ("pattern_data/graphs_json/P36.jsonl", '{"lemma": "capital"}', "'pattern' must be a non-empty string"),
])
def test_bad_lines_name_file_and_line(tmp_path, file, line, message):
    data = _copy(tmp_path)
    path = data / file
    n_lines = len(path.read_text().splitlines())
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(UserError, match=message) as info:
        load_pararel(data)
    assert f"{path}:{n_lines + 1}:" in str(info.value)


def test_no_usable_fact_is_an_error(tmp_path):
    data = _copy(tmp_path)
    for name in ("P19", "P36"):
        (data / "pattern_data" / "graphs_json" / f"{name}.jsonl").write_text('{"pattern": "[Y] is it ."}\n')
    with pytest.raises(UserError, match="no ParaRel fact has 2 usable prompts"):
        load_pararel(data)


def test_facts_option_dispatches_on_folder_or_file(tmp_path):
    args = build_parser().parse_args(["knowledge", "--facts", str(FIXTURE), "--relations", "P36",
                                      "--max-prompts-per-fact", "2"])
    facts = load_facts_option(args)
    assert {f.relation for f in facts} == {"P36"} and len(facts) == 6
    assert all(len(f.prompts) == 2 for f in facts)
    with pytest.raises(UserError, match="no such file"):
        load_facts_option(build_parser().parse_args(["--facts", str(tmp_path / "none.jsonl")]))


# -----------------------------------------------------------------------------
# selection

def test_select_relations_and_unknown_relation():
    chosen = select_facts(FACTS, ["capital_of", "author_of"])
    assert [f for f in FACTS if f.relation in ("capital_of", "author_of")] == chosen
    with pytest.raises(UserError, match=r"unknown relation\(s\) P36; available: capital_of, landmark_city"):
        select_facts(FACTS, ["capital_of", "P36"])


def test_seeded_sample_per_relation_is_order_independent():
    groups = relations(FACTS)
    sample = select_facts(FACTS, max_facts_per_relation=2, seed=3)
    assert {r: len(v) for r, v in relations(sample).items()} == {r: 2 for r in groups}
    assert sample == [f for f in FACTS if f in sample]  # input order kept
    shuffled = list(reversed(FACTS))
    assert set(select_facts(shuffled, max_facts_per_relation=2, seed=3)) == set(sample)
    assert select_facts(FACTS, max_facts_per_relation=2, seed=3) == sample
    samples = {tuple(f.id for f in select_facts(FACTS, max_facts_per_relation=2, seed=s)) for s in range(6)}
    assert len(samples) > 1  # the seed changes the draw
    assert select_facts(FACTS, max_facts_per_relation=100) == list(FACTS)


def test_max_prompts_keeps_the_first_ones():
    chosen = select_facts(FACTS, max_prompts_per_fact=2)
    assert [f.prompts for f in chosen] == [f.prompts[:2] for f in FACTS]
    validate_facts(chosen)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_facts_per_relation": 0}, "--max-facts-per-relation must be at least 1"),
    ({"max_prompts_per_fact": 1}, "--max-prompts-per-fact must be at least 2"),
    ({"relations": []}, "no relation given"),
])
def test_bad_selection_options(kwargs, message):
    with pytest.raises(UserError, match=message):
        select_facts(FACTS, **kwargs)


def test_knowledge_mode_on_a_pararel_folder(demo_models, tmp_path):
    out = tmp_path / "out"
    assert main(["knowledge", "--gpt2-model", str(demo_models["gpt2"]), "--mamba-model", str(demo_models["mamba"]),
                 "--facts", str(FIXTURE), "--relations", "P36,P19", "--max-facts-per-relation", "1",
                 "--max-prompts-per-fact", "2", "--steps", "2", "--out", str(out), "-q"]) == 0
    doc = json.loads((out / "gpt2_knowledge_neurons.json").read_text())
    expected = select_facts(load_pararel(FIXTURE), max_facts_per_relation=1, max_prompts_per_fact=2)
    assert [(f["id"], f["relation"]) for f in doc["facts"]] == [(f.id, f.relation) for f in expected]
    assert [f["relation"] for f in doc["facts"]] == ["P19", "P36"]
    assert [[p["prompt"] for p in f["prompts"]] for f in doc["facts"]] == [list(f.prompts) for f in expected]
    assert doc["arguments"]["relations"] == "P36,P19" and doc["arguments"]["max_facts_per_relation"] == 1


def test_bytes_that_are_not_utf8_name_file_and_line(tmp_path):
    data = _copy(tmp_path)
    path = data / "trex_lms_vocab/P36.jsonl"
    n_lines = len(path.read_text().splitlines())
    path.write_bytes(path.read_bytes() + b'{"sub_label": "Fran\xe7e", "obj_label": "Paris"}\n')
    with pytest.raises(UserError, match="not valid UTF-8") as info:
        load_pararel(data)
    assert f"{path}:{n_lines + 1}:" in str(info.value)


# -----------------------------------------------------------------------------
# dropped relations and skipped facts (issue 18, cases 10 and 11)

def test_a_dropped_relation_is_a_warning_with_its_reason(tmp_path, caplog):
    data = _copy(tmp_path)
    (data / "pattern_data" / "graphs_json" / "P27.jsonl").write_text("")  # P27 now has an empty pattern file
    with caplog.at_level(logging.WARNING):
        facts, dropped = read_pararel(data)
    assert dropped == {
        "P20": "no fact file",
        "P27": f"{data / 'pattern_data' / 'graphs_json' / 'P27.jsonl'} holds no pattern",
        "P101": "none of its 2 patterns is usable ([Y] must end the pattern, after a space, with [X] before it)",
    }
    assert {r.levelname for r in caplog.records} == {"WARNING"}  # -q shows them
    for relation, reason in dropped.items():
        assert f"ParaRel {relation} dropped: {reason}" in caplog.text
    assert {f.relation for f in facts} == {"P19", "P36"}


def test_dropped_relations_are_recorded_in_the_json(tiny_gpt2, tiny_mamba, tmp_path, monkeypatch):
    from run import pipeline

    seen = []
    monkeypatch.setattr(pipeline, "run_knowledge", lambda args, *_: seen.append(pipeline.notes(args)))
    assert main(["knowledge", "--facts", str(FIXTURE), "--gpt2-model", tiny_gpt2[0].config._name_or_path,
                 "--mamba-model", tiny_mamba[0].config._name_or_path, "--out", str(tmp_path), "-q"]) == 0
    assert set(seen[0]["dropped_relations"]) == {"P20", "P27", "P101"}


def test_answer_in_a_word_of_the_subject_is_no_leak():
    assert not answer_in_prompt("The language of Germany is", "Germany", "German")
    assert answer_in_prompt("Cora Vale was born in", "Cora Vale", "Vale")  # a whole word of the subject
    assert answer_in_prompt("Germany, where German is spoken, uses", "Germany", "German")  # outside the subject
    validate_facts([Fact("de", "language", "Germany", "German", ("The language of Germany is",
                                                                 "People in Germany speak"))])
