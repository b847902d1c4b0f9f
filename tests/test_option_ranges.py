"""Options out of range, options a mode ignores and models that do not suit the mode (issue 18, cases 1-9): one
line on stderr and no stage run, or a warning that says what is ignored and is stored in the output JSON."""

from __future__ import annotations

import json
import logging

import pytest

from facts import FACTS, relations
from main import main
from run import pipeline

TWO_RELATIONS = list(relations(FACTS).values())[:2]
FACTS6 = [f for facts in TWO_RELATIONS for f in facts[:3]]  # 6 facts of 2 relations
SINGLE = [facts[0] for facts in TWO_RELATIONS]  # 2 relations with 1 fact each: no fact has a new answer


def _facts_file(path, facts):
    path.write_text("\n".join(json.dumps({"id": f.id, "relation": f.relation, "subject": f.subject,
                                          "answer": f.answer, "prompts": list(f.prompts)}) for f in facts))
    return str(path)


@pytest.fixture
def stages(monkeypatch):
    """Replace the four modes by recorders: a check that fails must stop the run before any of them."""
    calls = []
    for mode in ("knowledge", "attention", "comprehensive", "edit"):
        monkeypatch.setattr(pipeline, f"run_{mode}", lambda *a, mode=mode: calls.append(mode))
    return calls


@pytest.fixture
def models(tiny_gpt2, tiny_mamba):
    return ["--gpt2-model", tiny_gpt2[0].config._name_or_path, "--mamba-model", tiny_mamba[0].config._name_or_path]


def _error(capsys, stages, argv) -> str:
    assert main([*argv, "-q"]) == 1
    assert stages == []
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("option, value, message", [
    ("--permutations", "0", "--permutations 0: must be an integer >= 1"),  # case 2
    ("--bootstrap", "0", "--bootstrap 0: must be an integer >= 1"),
    ("--bootstrap", "-3", "--bootstrap -3: must be an integer >= 1"),
    ("--seed", "-1", "--seed -1: must be an integer in [0, 2^32)"),  # case 3
    ("--random-draws", "0", "--random-draws 0: must be an integer >= 1"),  # case 4
    ("--steps", "0", "--steps 0: must be an integer >= 1"),
    ("--threshold", "nan", "--threshold nan: must be a number in (0, 1]"),
    ("--max-prompts-per-fact", "1", "--max-prompts-per-fact 1: must be an integer >= 2"),
    ("--prompts-per-batch", "0", "--prompts-per-batch 0: must be an integer >= 1"),
    ("--save-scores", "all", "--save-scores all: must be one of none, fact, prompt"),
])
@pytest.mark.parametrize("mode", ["comprehensive", "edit"])
def test_option_out_of_range_stops_before_any_stage(mode, option, value, message, tmp_path, capsys, stages):
    err = _error(capsys, stages, [mode, option, value, "--out", str(tmp_path)])
    assert err.startswith(f"error: {message}")


@pytest.mark.parametrize("value", ["0", "-5"])
def test_erase_top_out_of_range(value, tmp_path, capsys, stages):  # case 4
    err = _error(capsys, stages, ["edit", "--erase-top", value, "--out", str(tmp_path)])
    assert err == f"error: --erase-top {value}: must be an integer >= 1\n"


@pytest.mark.parametrize("lambdas", [["nan", "inf"], ["1", "inf"], ["-1", "8"]])
def test_edit_lambdas_must_be_finite_and_not_negative(lambdas, tmp_path, capsys, stages):  # case 7
    err = _error(capsys, stages, ["edit", "--edit-lambdas", *lambdas, "--out", str(tmp_path)])
    assert err.startswith(f"error: --edit-lambdas {lambdas[0]} {lambdas[1]}: must be two finite numbers >= 0")


def test_save_edited_that_is_a_file(tmp_path, capsys, stages):  # case 1
    target = tmp_path / "file"
    target.write_text("x")
    err = _error(capsys, stages, ["edit", "--save-edited", str(target), "--out", str(tmp_path / "out")])
    assert err == f"error: --save-edited {target}: this is an existing file, not a folder; pass a folder for the " \
                  "results\n"


def test_save_edited_that_cannot_be_created(tmp_path, capsys, stages):  # case 1
    err = _error(capsys, stages, ["edit", "--save-edited", "/proc/x", "--out", str(tmp_path)])
    assert err.startswith("error: --save-edited /proc/x: cannot create or write to this folder (")


def test_save_edited_model_folder_that_is_a_file(models, tmp_path, capsys, stages):  # case 1
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "gpt2").write_text("x")
    err = _error(capsys, stages, ["edit", *models, "--facts", _facts_file(tmp_path / "f.jsonl", FACTS6),
                                  "--save-edited", str(tmp_path / "saved"), "--out", str(tmp_path / "out")])
    assert f"{tmp_path / 'saved' / 'gpt2'} is an existing file" in err


def test_save_edited_over_a_saved_model_warns(models, tmp_path, caplog, stages):  # case 1
    (tmp_path / "saved" / "mamba").mkdir(parents=True)
    (tmp_path / "saved" / "mamba" / "config.json").write_text("{}")
    with caplog.at_level(logging.WARNING):
        assert main(["edit", *models, "--facts", _facts_file(tmp_path / "f.jsonl", FACTS6), "--save-edited",
                     str(tmp_path / "saved"), "--out", str(tmp_path / "out"), "-q"]) == 0
    assert stages == ["edit"]
    assert f"{tmp_path / 'saved' / 'mamba'} already holds a model; it will be replaced" in caplog.text


def test_save_edited_without_any_new_answer_stops_up_front(models, tmp_path, capsys, stages):  # case 5
    err = _error(capsys, stages, ["edit", *models, "--facts", _facts_file(tmp_path / "f.jsonl", SINGLE),
                                  "--save-edited", str(tmp_path / "saved"), "--out", str(tmp_path / "out")])
    assert err.startswith("error: --save-edited: no fact has a new answer")


def test_save_edited_without_knowledge_neurons_writes_the_results(demo_models, tmp_path, monkeypatch, caplog):
    """Case 5, the late half: no fact has knowledge neurons (known only after attribution): the editing JSON is
    written all the same, says why nothing was saved, and a warning says so."""
    from analysis.stage import ModelResult

    monkeypatch.setattr(ModelResult, "refined", property(lambda self: {r.fact.id: [] for r in self.facts}))
    out, saved = tmp_path / "out", tmp_path / "saved"
    with caplog.at_level(logging.WARNING):
        assert main(["edit", "--models", f"gpt2={demo_models['gpt2']}", "--facts",
                     _facts_file(tmp_path / "f.jsonl", FACTS6[:2] + FACTS6[3:5]), "--steps", "2", "--random-draws",
                     "1", "--save-edited", str(saved), "--out", str(out), "-q"]) == 0
    doc = json.loads((out / "gpt2_knowledge_editing.json").read_text())
    assert doc["saved_edited_model"] is None and doc["save_edited_skipped"].startswith("no fact could be edited")
    assert doc["details"]["facts_edited"] == 0
    assert "nothing saved for gpt2" in caplog.text
    assert not (saved / "gpt2").exists()


def test_attention_mode_without_a_state_space_model_before_the_demo_build(tmp_path, capsys, stages):  # case 6
    cache = tmp_path / "cache"
    err = _error(capsys, stages, ["attention", "--demo", "--demo-cache", str(cache), "--models", "a=gpt2",
                                  "--out", str(tmp_path / "out")])
    assert err == "error: attention mode needs a state-space model (Mamba, Mamba-2, Falcon-Mamba) among the models; " \
                  "these are a: gpt2\n"
    assert not cache.exists() or not any(cache.iterdir())  # no demo model was built


def test_attention_mode_without_a_state_space_model_from_the_config(tiny_gpt2, tmp_path, capsys, stages):  # case 6
    err = _error(capsys, stages, ["attention", "--models", f"a={tiny_gpt2[0].config._name_or_path}",
                                  "--out", str(tmp_path)])
    assert "attention mode needs a state-space model" in err


def test_empty_models_option_is_an_error(tmp_path, capsys, stages):  # case 8
    err = _error(capsys, stages, ["knowledge", "--models", "", "--out", str(tmp_path)])
    assert "--models names no model" in err


@pytest.mark.parametrize("argv, warning", [
    (["knowledge", "--save-edited", "somewhere"], "--save-edited somewhere is ignored: knowledge mode does not use it"),
    (["attention", "--permutations", "50"], "--permutations 50 is ignored: attention mode does not use it"),
    (["edit", "--edit-rule", "eleuther", "--edit-lambdas", "5", "5"],
     "--edit-lambdas 5 5 is ignored: the eleuther rule has fixed weights"),
])
def test_ignored_options_are_warned_about(argv, warning, models, tmp_path, caplog, stages):  # case 9
    with caplog.at_level(logging.WARNING):
        assert main([*argv, *models, "--facts", _facts_file(tmp_path / "f.jsonl", FACTS6), "--out",
                     str(tmp_path / "out"), "-q"]) == 0
    assert stages == [argv[0]]
    assert warning in caplog.text
    assert not (tmp_path / "somewhere").exists()


def test_ignored_options_are_recorded_in_the_json(models, tmp_path):  # case 9
    out = tmp_path / "out"
    assert main(["knowledge", *models, "--facts", _facts_file(tmp_path / "f.jsonl", FACTS6[:2]), "--steps", "2",
                 "--bootstrap", "10", "--out", str(out), "-q"]) == 0
    doc = json.loads((out / "gpt2_knowledge_neurons.json").read_text())
    assert doc["warnings"] == [
        "--bootstrap 10 is ignored: knowledge mode does not use it (used in comprehensive and trace mode)"]
    assert "warnings" not in doc["arguments"] and doc["arguments"]["bootstrap"] == 10


@pytest.mark.parametrize("rank, printed", [("0", "error: --seed -1: must be an integer in [0, 2^32)\n"), ("1", "")])
def test_under_torchrun_rank_0_alone_prints_an_input_error(rank, printed, monkeypatch, tmp_path, capsys):  # case 19
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    assert main(["knowledge", "--seed", "-1", "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err == printed
