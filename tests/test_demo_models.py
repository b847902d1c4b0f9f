"""The offline demo models: they know the facts, are cached by a key that follows the facts, settings and
versions, are reused without training, and are never saved when training fails."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import threading
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from common.errors import UserError
from common.tokens import subject_positions
from facts import FACTS, facts_hash
from models import adapter_for, load_model
from models import demo as dm


class _NoTraining(Exception):
    pass


def _no_training(*args, **kwargs):
    raise _NoTraining("ensure_demo_models tried to train a model")


@pytest.mark.parametrize("arch", dm.DEFAULT_ARCHS)
def test_demo_model_knows_the_facts_after_loading(demo_models, arch):
    folder = demo_models[arch]
    assert folder.is_dir() and folder.name == dm.demo_key(arch, FACTS)
    model, tokenizer = load_model(str(folder))
    assert model.config.model_type == arch
    adapter = adapter_for(model)  # the analysis can run on it
    assert adapter.n_layers >= 2 and adapter.width >= 64

    accuracy = dm.demo_accuracy(model, tokenizer, FACTS)
    info = dm.read_info(folder)
    assert accuracy >= dm.MIN_ACCURACY
    assert info["accuracy"] == pytest.approx(accuracy)  # the recorded number is the loaded model's
    assert info["arch"] == arch
    assert info["facts_hash"] == facts_hash(FACTS)
    assert info["settings"]["model"] == json.loads(json.dumps(dm.DEMO_SETTINGS[arch]))
    assert info["torch"] == torch.__version__
    assert info["training_seconds"] > 0


@pytest.mark.parametrize("arch", [a for a in dm.ARCHS if a not in dm.DEFAULT_ARCHS])
def test_demo_model_of_every_other_architecture(tmp_path, arch):
    """Pythia's GPT-NeoX, Falcon-Mamba and Mamba-2 demo models, trained on a few facts, know them and load."""
    facts = FACTS[:6]
    folder = dm.ensure_demo_models(facts, cache_dir=tmp_path, progress=False, archs=[arch])[arch]
    model, tokenizer = load_model(str(folder))
    assert model.config.model_type == arch
    assert adapter_for(model).n_layers == dm.DEMO_SETTINGS[arch]["num_hidden_layers"]
    assert dm.demo_accuracy(model, tokenizer, facts) >= dm.MIN_ACCURACY


def test_unknown_demo_architecture_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no demo model for llama"):
        dm.ensure_demo_models(FACTS, cache_dir=tmp_path, progress=False, archs=["llama"])


def test_demo_accuracy_can_fail(demo_models):
    """demo_accuracy is not vacuous: the gpt2 demo model does not know facts with other answers."""
    model, tokenizer = load_model(str(demo_models["gpt2"]))
    swapped = [dataclasses.replace(f, answer=FACTS[(i + 1) % len(FACTS)].answer) for i, f in enumerate(FACTS)]
    swapped = [f for f, g in zip(swapped, FACTS, strict=True) if f.answer != g.answer]
    assert dm.demo_accuracy(model, tokenizer, swapped) < 0.2


def test_second_call_reuses_the_cache_without_training(demo_models, monkeypatch, caplog):
    monkeypatch.setattr(dm, "_train", _no_training)
    cache = demo_models["gpt2"].parent
    with caplog.at_level(logging.INFO, logger="models.demo"):
        again = dm.ensure_demo_models(FACTS, cache_dir=cache, progress=False)
    assert again == demo_models
    assert sum("reusing cached demo model" in r.getMessage() for r in caplog.records) == len(dm.DEFAULT_ARCHS)


def test_incomplete_folder_is_rebuilt_not_reused(tmp_path, monkeypatch):
    """A folder without demo_info.json (an interrupted copy) is not taken for a model."""
    (tmp_path / dm.demo_key("gpt2", FACTS)).mkdir()
    monkeypatch.setattr(dm, "_train", _no_training)
    with pytest.raises(_NoTraining):
        dm.ensure_demo_models(FACTS, cache_dir=tmp_path, progress=False)


def test_concurrent_runs_build_each_model_once(tmp_path, monkeypatch, caplog):
    """Two runs on one empty cache: the second waits on the lock, then reuses what the first built."""
    builds: list[str] = []
    second_waits = threading.Event()

    class Waiting(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("waiting for another process"):
                second_waits.set()

    def build(arch, facts, folder, progress):
        builds.append(arch)
        if len(builds) == 1:  # the first build holds the lock until the other run is seen waiting for it
            assert second_waits.wait(timeout=30), "the second run did not wait for the lock"
        folder.mkdir()
        (folder / dm.INFO_FILE).write_text("{}")

    monkeypatch.setattr(dm, "_build", build)
    handler = Waiting()
    dm.log.addHandler(handler)
    caplog.set_level(logging.INFO, logger="models.demo")
    results: dict[int, dict] = {}
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            results[k] = dm.ensure_demo_models(FACTS, cache_dir=tmp_path, progress=False)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    runs = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    try:
        runs[0].start()
        while not builds and runs[0].is_alive():  # the first run holds the lock of the first model
            threading.Event().wait(0.01)
        runs[1].start()
        for t in runs:
            t.join(timeout=60)
    finally:
        dm.log.removeHandler(handler)
    assert not errors and second_waits.is_set()
    assert builds == list(dm.DEFAULT_ARCHS)  # each model trained once, by whichever run got its lock
    assert results[0] == results[1] and all(dm.is_demo_model(p) for p in results[0].values())


def test_is_demo_model(demo_models, tmp_path):
    assert all(dm.is_demo_model(p) for p in demo_models.values())
    assert not dm.is_demo_model(tmp_path) and not dm.is_demo_model("gpt2")


def test_key_follows_facts_settings_and_versions(monkeypatch):
    first = FACTS[0]
    edited = (dataclasses.replace(first, prompts=(first.prompts[0] + " really", *first.prompts[1:])), *FACTS[1:])
    for arch in dm.ARCHS:
        key = dm.demo_key(arch, FACTS)
        assert key == dm.demo_key(arch, tuple(FACTS))  # stable
        assert dm.demo_key(arch, edited) != key
        assert dm.demo_key(arch, FACTS[:-1]) != key
        assert dm.demo_key(arch, FACTS[::-1]) != key
        settings = copy.deepcopy(dm.DEMO_SETTINGS)
        settings[arch]["steps"] += 1
        assert dm.demo_key(arch, FACTS, settings) != key
        settings = copy.deepcopy(dm.DEMO_SETTINGS)
        settings["tokenizer"]["vocab_size"] += 1
        assert dm.demo_key(arch, FACTS, settings) != key
        with monkeypatch.context() as m:
            m.setattr(dm.transformers, "__version__", "99.1.0")
            assert dm.demo_key(arch, FACTS) != key
        with monkeypatch.context() as m:
            m.setattr(dm.torch, "__version__", "0.1.0")
            assert dm.demo_key(arch, FACTS) != key
    assert dm.demo_key("gpt2", FACTS) != dm.demo_key("mamba", FACTS)
    with pytest.raises(ValueError):
        dm.demo_key("llama", FACTS)


@pytest.mark.parametrize("arch", dm.DEFAULT_ARCHS)
def test_tokenizer_round_trip(demo_models, arch):
    _, tokenizer = load_model(str(demo_models[arch]))
    assert 300 <= len(tokenizer) <= 700
    assert tokenizer.eos_token == dm.EOS and tokenizer.eos_token_id is not None
    spaced = tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    bare = tokenizer("Paris", add_special_tokens=False)["input_ids"]
    assert spaced != bare
    assert len(spaced) == 1  # a known answer after its space is one token

    text = "The capital of France is Paris"
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    pieces = [text[a:b] for a, b in enc["offset_mapping"]]
    assert "".join(pieces) == text
    assert tokenizer.decode(enc["input_ids"]) == text
    assert [pieces[i].strip() for i in subject_positions(tokenizer, text, "France")] == ["France"]
    # byte-level: text never seen in training still round-trips
    odd = "Zürich → 東京"
    assert tokenizer.decode(tokenizer(odd, add_special_tokens=False)["input_ids"]) == odd


def test_demo_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv(dm.ENV_CACHE, str(tmp_path / "from_env"))
    for var in ("XDG_CACHE_HOME", "HOME", "LOCALAPPDATA"):  # keep the platform default inside tmp_path
        monkeypatch.setenv(var, str(tmp_path / "home"))
    explicit = dm.demo_cache_dir(tmp_path / "explicit")
    assert explicit == tmp_path / "explicit" and explicit.is_dir()
    assert dm.demo_cache_dir() == tmp_path / "from_env" and (tmp_path / "from_env").is_dir()
    monkeypatch.delenv(dm.ENV_CACHE)
    default = dm.demo_cache_dir()
    assert default.is_dir() and default.parts[-2:] == ("knowledge-neurons", "demo")
    assert tmp_path / "home" in default.parents


def test_bad_model_raises_and_leaves_nothing(tmp_path, monkeypatch):
    """Training that does not reach the accuracy bar raises and saves no model (not even a temp folder)."""

    def untrained(arch, facts, progress=True, settings=None):
        tokenizer = dm.build_tokenizer(facts)
        torch.manual_seed(0)
        cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_inner=32, vocab_size=len(tokenizer),
                         n_positions=64, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
        return GPT2LMHeadModel(cfg).eval(), tokenizer, 0.0

    monkeypatch.setattr(dm, "_train", untrained)
    with pytest.raises(RuntimeError, match="accuracy"):
        dm.ensure_demo_models(FACTS[:4], cache_dir=tmp_path, progress=False)
    # only the lock file stays (deleting it could let a waiting run lock a file that is no longer the lock)
    assert [p.name for p in Path(tmp_path).iterdir()] == [f".{dm.demo_key('gpt2', FACTS[:4])}.lock"]


def test_training_data_matches_the_analysis_tokenization(demo_models):
    """The training batch holds exactly prompt ids + answer ids (tokens.encode), answer targets weighted."""
    _, tokenizer = load_model(str(demo_models["gpt2"]))
    inputs, targets, weights, mask = dm._batch(tokenizer, FACTS, answer_weight=1.0, context_weight=0.1)
    assert inputs.shape[0] == sum(len(f.prompts) for f in FACTS)
    from common.tokens import encode

    fact = FACTS[0]
    prompt_ids, answer_ids = encode(tokenizer, fact.prompts[0], fact.answer)
    seq = prompt_ids + answer_ids
    n = len(seq) - 1
    assert inputs[0, :n].tolist() == seq[:-1]
    assert targets[0, :n].tolist() == seq[1:]
    answer_rows = weights[0, len(prompt_ids) - 1 : n]
    assert torch.all(answer_rows == 1.0)
    assert torch.allclose(weights[0, : len(prompt_ids) - 1], torch.tensor(0.1))
    assert torch.all(weights[0, n:] == 0) and torch.equal(mask[0], (weights[0] > 0).long())
