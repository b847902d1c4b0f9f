"""Sharding over torchrun ranks: the work plan, and 2-process gloo runs against one process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from analysis.scores import load_scores
from analysis.stage import ModelResult, Options
from common.errors import UserError
from common.tokens import encode
from facts import FACTS, relations
from main import main
from run import distributed

ROOT = Path(__file__).resolve().parents[1]
SUBSET = [f for facts in list(relations(FACTS).values())[:2] for f in facts[:2]]


def _rows(facts) -> list[dict]:
    return [{"id": f.id, "relation": f.relation, "subject": f.subject, "answer": f.answer,
             "prompts": list(f.prompts)} for f in facts]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _args(demo_models, facts: Path, out: Path) -> list[str]:
    return ["knowledge", "--gpt2-model", str(demo_models["gpt2"]), "--mamba-model", str(demo_models["mamba"]),
            "--facts", str(facts), "--out", str(out), "--steps", "4"]


def _injected(tmp_path: Path, code: str) -> str:
    """A PYTHONPATH under which every process (launcher and ranks) runs `code` first, as its sitecustomize."""
    folder = tmp_path / "inject"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(code)
    return os.pathsep.join([str(folder), str(ROOT)])


def _torchrun(args: list[str], ranks: int = 2, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           "main.py", *args, "-q"]
    return subprocess.run(cmd, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)


# -----------------------------------------------------------------------------
# the plan

def _greedy_reference(work, n):
    """Longest first onto the least-loaded rank, written as plainly as possible."""
    loads, shares = [0] * n, [[] for _ in range(n)]
    for i in sorted(range(len(work)), key=lambda i: (-work[i], i)):
        r = min(range(n), key=lambda r: (loads[r], r))
        shares[r].append(i)
        loads[r] += work[i]
    return [sorted(s) for s in shares]


def test_shard_by_hand():
    # 9 -> r0; 7 -> r1; 5 (index 1) -> r1 (load 7 < 9); 5 (index 4) -> r0; 2 -> r0 (14 vs 12: r1), ...
    assert distributed.shard([9, 5, 7, 2, 5], 2) == [[0, 4], [1, 2, 3]]  # loads 14 and 14
    assert distributed.shard([1, 1, 1], 2) == [[0, 2], [1]]  # ties: lower index onto the lower rank
    assert distributed.shard([4], 3) == [[0], [], []]


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_shard_matches_the_plain_greedy_and_balances(n):
    rng = np.random.default_rng(n)
    work = [int(w) for w in rng.integers(1, 40, size=60)]
    shares = distributed.shard(work, n)
    assert shares == _greedy_reference(work, n)
    assert sorted(i for s in shares for i in s) == list(range(len(work)))
    loads = [sum(work[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= max(work)  # greedy longest-first: within one item of each other


def test_fact_work_counts_prompt_answer_tokens(tiny_gpt2):
    _, tokenizer = tiny_gpt2
    work = distributed.fact_work(tokenizer, FACTS)
    expected = [sum(len(encode(tokenizer, p, f.answer)[1]) for p in f.prompts) for f in FACTS]
    assert work == expected
    assert max(work) > min(work)  # multi-token answers cost more


def test_one_process_calls_the_attribution_directly(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    result = ModelResult("m", "gpt2", "site", 1, 1, Options(), [])
    calls = []
    assert distributed.shard_and_gather(lambda facts, progress: calls.append((facts, progress)) or result, None,
                                        FACTS[:2], progress=False) is result
    assert calls == [(list(FACTS[:2]), False)]


def test_error_lines_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert distributed.error_line(distributed.RankFailed("rank 1 failed")) is None  # rank 0 reports it
    assert distributed.error_line(UserError("no model")) == "rank 1: no model"
    monkeypatch.setenv("RANK", "0")
    assert distributed.error_line(distributed.RankFailed("rank 1 failed")) == "rank 1 failed"


# -----------------------------------------------------------------------------
# torchrun with 2 gloo ranks

@pytest.mark.parametrize("baseline", ["mean"])  # the zero baseline: the invented facts' test below
def test_two_ranks_give_the_one_process_results(demo_models, tmp_path, baseline):
    """The mean baseline, which every rank computes from all facts, not from its share."""
    facts = _write(tmp_path / "facts.jsonl", _rows(SUBSET))
    run = _torchrun([*_args(demo_models, facts, tmp_path / "two"), "--baseline", baseline])
    assert run.returncode == 0, run.stderr[-3000:]
    assert main([*_args(demo_models, facts, tmp_path / "one"), "--baseline", baseline, "-q"]) == 0
    for arch in ("gpt2", "mamba"):
        one = json.loads((tmp_path / "one" / f"{arch}_knowledge_neurons.json").read_text())
        two = json.loads((tmp_path / "two" / f"{arch}_knowledge_neurons.json").read_text())
        assert [f["id"] for f in two["facts"]] == [f.id for f in SUBSET]
        assert sum(f["n_refined"] for f in one["facts"]) > 0
        for a, b in zip(one["facts"], two["facts"], strict=True):
            assert [n[:2] for n in a["refined_neurons"]] == [n[:2] for n in b["refined_neurons"]]
            np.testing.assert_allclose([n[2] for n in a["refined_neurons"]], [n[2] for n in b["refined_neurons"]],
                                       rtol=0, atol=1e-6)
        assert one["overlap"] == two["overlap"]  # from the refined sets alone
        assert one["scores_files"] == [f"{arch}_knowledge_neurons.npz"]
        assert two["scores_files"] == [f"{arch}_knowledge_neurons.rank{r}-of-2.npz" for r in range(2)]
        with load_scores(tmp_path / "one" / f"{arch}_knowledge_neurons.json") as x, \
                load_scores(tmp_path / "two" / f"{arch}_knowledge_neurons.json") as y:
            assert sorted(x) == sorted(y) and len(x) == 3 * len(SUBSET)  # scores, deltas, coarse neurons
            # float32 products on 1 thread (a rank) and on 2 (here) round differently: scores to 1e-6; a
            # completeness delta is a difference of terms of order 1 (the scores' sum and
            # P(answer) - P(baseline)), so its round-off is absolute, about 1e-6 of those terms
            for key in x:
                if not key.endswith("coarse_neurons"):  # a neuron at the threshold may flip with the round-off
                    np.testing.assert_allclose(x[key], y[key], rtol=0, atol=1e-5 if key.endswith("delta") else 1e-6)
    # every rank cached its own facts: all of them are in the (here shared) cache
    assert len(list((tmp_path / "two" / ".kn_cache").rglob("*.pt"))) == 2 * len(SUBSET)


def test_two_ranks_of_invented_facts_write_shards_equal_to_one_process(tiny_gpt2, tiny_mamba, tmp_path):
    """30 invented facts on tiny random models: each rank writes the scores of its own facts to its shard; read
    back together they are the one process's file, and the JSONs agree."""
    rows = [{"id": f"inv{k}", "relation": f"r{k % 3}", "subject": f"Zorvek{k}", "answer": f"Talun{k % 5}",
             "prompts": [f"Zorvek{k} was born in", f"The birthplace of Zorvek{k} is"]} for k in range(30)]
    facts = _write(tmp_path / "facts.jsonl", rows)
    args = ["knowledge", "--gpt2-model", tiny_gpt2[0].config._name_or_path, "--mamba-model",
            tiny_mamba[0].config._name_or_path, "--facts", str(facts), "--steps", "3"]
    run = _torchrun([*args, "--out", str(tmp_path / "two")])
    assert run.returncode == 0, run.stderr[-3000:]
    assert main([*args, "--out", str(tmp_path / "one"), "-q"]) == 0
    for arch in ("gpt2", "mamba"):
        one, two = (json.loads((tmp_path / d / f"{arch}_knowledge_neurons.json").read_text()) for d in ("one", "two"))
        assert two["options"]["save_scores"] == "prompt" and not (tmp_path / "two" / f"{arch}_knowledge_neurons.npz"
                                                                   ).exists()
        # a rank batches its facts with other companions than one process does: float32 round-off, 1e-6
        for a, b in zip(one["facts"], two["facts"], strict=True):
            assert [n[:2] for n in a["refined_neurons"]] == [n[:2] for n in b["refined_neurons"]]
            np.testing.assert_allclose([n[2] for n in a["refined_neurons"]], [n[2] for n in b["refined_neurons"]],
                                       rtol=1e-5)
            np.testing.assert_allclose([p["p_answer"] for p in a["prompts"]], [p["p_answer"] for p in b["prompts"]],
                                       rtol=1e-5)
        assert sum(f["n_refined"] for f in one["facts"]) > 0
        keys = []
        for name in two["scores_files"]:
            with np.load(tmp_path / "two" / name) as shard:
                keys.append(set(shard.files))
        assert all(keys) and not keys[0] & keys[1]  # each rank's own facts
        with load_scores(tmp_path / "one" / f"{arch}_knowledge_neurons.json") as x, \
                load_scores(tmp_path / "two" / f"{arch}_knowledge_neurons.json") as y:
            assert sorted(x) == sorted(y) and len(x) == 3 * len(rows)
            for key in (k for k in x if k.endswith("scores")):
                np.testing.assert_allclose(x[key], y[key], rtol=0, atol=1e-6 * float(np.abs(x[key]).max()))


FAILURE = """
import knowledge_neurons

attribute_many = knowledge_neurons.KnowledgeNeurons.attribute_many


def failing(self, items, *args, **kwargs):
    if any("exploding" in prompt for prompt, _ in items):
        raise IndexError("injected by the test")
    return attribute_many(self, items, *args, **kwargs)


knowledge_neurons.KnowledgeNeurons.attribute_many = failing
"""


def test_a_failing_rank_stops_every_rank_and_writes_nothing(demo_models, tmp_path):
    """Attribution fails on the rank that gets fact `boom` (a failure injected through sitecustomize)."""
    rows = [*_rows(SUBSET), {"id": "boom", "relation": "capital_of", "subject": "France", "answer": "Paris",
                             "prompts": ["The exploding capital of France is", "France's exploding capital is"]}]
    facts = _write(tmp_path / "facts.jsonl", rows)
    out = tmp_path / "out"
    run = _torchrun(_args(demo_models, facts, out), pythonpath=_injected(tmp_path, FAILURE))
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, run.stderr[-3000:]
    assert "failed on boom: IndexError" in errors[0] and errors[0].startswith("error: rank ")
    assert not [p for p in out.iterdir() if p.name != ".kn_cache"]


THREADS_AT_EXIT = """
import atexit
import os


def threads():
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    line = f"threads at exit of rank {os.environ.get('RANK', 'none')}: {' '.join(sorted(names))}\\n"
    os.write(2, line.encode())  # one write: the ranks share the pipe, and print's two writes interleave


atexit.register(threads)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists a process's threads through Linux's /proc")
def test_ranks_leave_no_gloo_threads_running_into_shutdown(tiny_gpt2, tiny_mamba, tmp_path):
    """A process group that outlives `destroy_process_group` (pinned by a torch module that transformers imports
    while loading a model) keeps gloo's threads running while the interpreter shuts down, where a rank aborted
    once in CI and torchrun killed the others mid-write. After `main` every rank's gloo threads are gone."""
    facts = _write(tmp_path / "facts.jsonl", [{"id": f"f{k}", "relation": "r", "subject": name, "answer": "Talun",
                                               "prompts": [f"{name} was born in"]}
                                              for k, name in enumerate(["Zorvek", "Quenta"])])
    run = _torchrun(["knowledge", "--gpt2-model", tiny_gpt2[0].config._name_or_path, "--mamba-model",
                     tiny_mamba[0].config._name_or_path, "--facts", str(facts), "--steps", "1", "--out",
                     str(tmp_path / "out")], pythonpath=_injected(tmp_path, THREADS_AT_EXIT))
    assert run.returncode == 0, run.stderr[-3000:]
    threads = dict(re.findall(r"^threads at exit of rank (\d+): (.*)$", run.stderr, re.MULTILINE))
    assert sorted(threads) == ["0", "1"], run.stderr[-3000:]
    assert not [names for names in threads.values() if "gloo" in names], threads
