"""Inputs that are wrong from the start: one line on stderr, exit status 1, and no stage has run."""

from __future__ import annotations

import json

import pytest
from transformers import GPT2Config, MambaConfig

from facts import FACTS
from main import main
from models import GPT2Adapter, MambaAdapter
from run import pipeline


@pytest.fixture
def stages(monkeypatch):
    """Replace the three modes by recorders: a check that fails must stop the run before any of them."""
    calls = []
    for mode in ("knowledge", "attention", "comprehensive"):
        monkeypatch.setattr(pipeline, f"run_{mode}", lambda *a, mode=mode: calls.append(mode))
    return calls


def _folder(model) -> str:
    return model.config._name_or_path


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def _run(capsys, stages, *argv) -> str:
    assert main([*argv, "-q"]) == 1
    assert stages == []
    return _error(capsys)


def _models(tiny_gpt2, tiny_mamba):
    return ["--gpt2-model", _folder(tiny_gpt2[0]), "--mamba-model", _folder(tiny_mamba[0])]


def test_good_arguments_reach_the_stage(tiny_gpt2, tiny_mamba, tmp_path, stages):
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"id": "capital_france", "relation": "capital_of", "subject": "France",
                                 "answer": "Paris", "prompts": ["The capital of France is"]}))
    assert main(["knowledge", *_models(tiny_gpt2, tiny_mamba), "--facts", str(facts), "--out",
                 str(tmp_path / "new" / "out"), "-q"]) == 0
    assert stages == ["knowledge"]
    assert (tmp_path / "new" / "out").is_dir()


def test_out_is_an_existing_file(tmp_path, capsys, stages):
    target = tmp_path / "results"
    target.write_text("not a folder")
    err = _run(capsys, stages, "knowledge", "--out", str(target))
    assert err == f"error: --out {target}: this is an existing file, not a folder; pass a folder for the results\n"


def test_out_cannot_be_created(capsys, stages):
    err = _run(capsys, stages, "knowledge", "--out", "/proc/x")
    assert err.startswith("error: --out /proc/x: cannot create or write to this folder (")


@pytest.mark.parametrize("device", ["banana", "cuda:x", "gpu", ""])
def test_bad_device_lists_the_choices(device, tmp_path, capsys, stages):
    err = _run(capsys, stages, "knowledge", "--device", device, "--out", str(tmp_path))
    assert err == f"error: --device {device}: not a device; choose auto, cpu, cuda or cuda:N\n"


def test_baseline_prompt_without_reference_baseline(tmp_path, capsys, stages):
    err = _run(capsys, stages, "knowledge", "--baseline-prompt", "The", "--out", str(tmp_path))
    assert "--baseline-prompt is used only with --baseline reference" in err


def test_model_path_that_does_not_exist(tmp_path, capsys, stages):
    missing = tmp_path / "nope"
    err = _run(capsys, stages, "knowledge", "--gpt2-model", str(missing), "--out", str(tmp_path))
    assert err == f"error: model '{missing}': no such folder ({missing})\n"


def test_relative_model_path_that_does_not_exist(tmp_path, capsys, stages, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _run(capsys, stages, "knowledge", "--gpt2-model", "./models/gpt2", "--out", str(tmp_path))
    assert err == f"error: model './models/gpt2': no such folder ({tmp_path / 'models' / 'gpt2'})\n"


def test_model_of_the_wrong_architecture_is_caught_before_any_stage(tiny_gpt2, tmp_path, capsys, stages):
    folder = _folder(tiny_gpt2[0])
    err = _run(capsys, stages, "knowledge", "--gpt2-model", folder, "--mamba-model", folder, "--out", str(tmp_path))
    assert err == f"error: --mamba-model {folder} is a 'gpt2' model, not mamba\n"


def test_prompt_longer_than_the_context_names_the_fact(tiny_gpt2, tiny_mamba, tmp_path, capsys, stages):
    long_prompt = "The capital of France, " + "which is a country in Europe, " * 20 + "is"
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"id": "capital_france", "relation": "capital_of", "subject": "France",
                                 "answer": "Paris", "prompts": ["The capital of France is", long_prompt]}))
    err = _run(capsys, stages, "knowledge", *_models(tiny_gpt2, tiny_mamba), "--facts", str(facts),
               "--out", str(tmp_path))
    tokens = len(tiny_gpt2[1](long_prompt)["input_ids"])
    assert tokens > 64  # the tiny GPT-2 has 64 positions
    assert err.startswith(f"error: fact capital_france, prompt 2: {tokens} prompt + ")
    assert f"more than the 64 of --gpt2-model {_folder(tiny_gpt2[0])}" in err


def test_long_baseline_prompt_is_caught(tiny_gpt2, tiny_mamba, tmp_path, capsys, stages):
    err = _run(capsys, stages, "knowledge", *_models(tiny_gpt2, tiny_mamba), "--baseline", "reference",
               "--baseline-prompt", "Paris " * 100, "--out", str(tmp_path))
    assert err.startswith("error: --baseline-prompt is longer than the 64 positions of --gpt2-model")


def test_max_positions_comes_from_the_config():
    assert GPT2Adapter.max_positions(GPT2Config(n_positions=64)) == 64
    assert MambaAdapter.max_positions(MambaConfig()) is None  # a recurrent model reads any length


def test_the_builtin_facts_fit_gpt2(tiny_gpt2, tiny_mamba, tmp_path, stages):
    assert len(FACTS) > 20
    assert main(["knowledge", *_models(tiny_gpt2, tiny_mamba), "--out", str(tmp_path), "-q"]) == 0
    assert stages == ["knowledge"]


@pytest.mark.parametrize(("option", "text"), [
    ("--attention-facts", "--attention-facts 0: must be an integer >= 1 (a sample size"),
    ("--edit-facts", "--edit-facts 0: must be an integer >= 1 (a sample size"),
    ("--locality-prompts", "--locality-prompts 0: must be an integer >= 1 (a sample size"),
])
def test_sample_sizes_must_be_positive(option, text, tmp_path, capsys, stages):
    assert text in _run(capsys, stages, "comprehensive", option, "0", "--out", str(tmp_path))


def test_demo_with_too_many_facts_stops_before_training(tmp_path, capsys, stages, monkeypatch):
    from models import demo

    monkeypatch.setattr(demo, "DEMO_MAX_FACTS", 3)
    monkeypatch.setattr(demo, "ensure_demo_models", lambda *a, **k: pytest.fail("trained a demo model"))
    err = _run(capsys, stages, "knowledge", "--demo", "--out", str(tmp_path))
    assert f"made for up to 3 facts; these are {len(FACTS)}" in err and "--max-facts-per-relation" in err
