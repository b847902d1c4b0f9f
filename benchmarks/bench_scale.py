"""Time and memory of everything after attribution at ParaRel size, on invented facts.

For each --facts N the benchmark writes a ParaRel-shaped folder (graphs_json/ and trex_lms_vocab/ side by side,
--relations relations of --patterns patterns each; subjects, answers and patterns are invented words, no
ParaRel or T-REx text), reads it back with `sources.pararel.load_pararel`, gives every fact an invented refined
neuron set (--neurons-per-fact neurons drawn uniformly from --layers x --width, as the issue's measurement did)
and runs the overlap statistics as the comprehensive mode does: `overlap_statistics` (summaries, relation
matrix, pair table only up to 300 facts), the sparse pair entries, the permutation test and the bootstrap over
facts. Each N runs in a fresh process, so its peak RSS is its own; the table gives each stage's seconds and
the process's peak RSS after it.

The reference in the same run: the pair-list implementation this replaced (tests/overlap_reference.py:
summaries + permutation test + pair bootstrap) against the new one on --reference-facts facts, and the ratio.

    python benchmarks/bench_scale.py [--facts 1000 3400 27738] [--permutations 1000] [--bootstrap 1000]

--knowledge N instead times the whole `main.py knowledge` run on N invented facts with tiny random GPT-2 and
Mamba (3 layers x width 32, GPT-2's 50,257-token vocabulary, --max-prompts-per-fact 2, --steps 5): wall time,
the run's peak RSS, the sizes of the JSON and npz files, and when each stage ended (from the run's log lines);
--mode comprehensive runs the whole comprehensive mode instead, --keep DIR keeps its outputs.

    python benchmarks/bench_scale.py --knowledge 340 [--mode comprehensive] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from analysis.overlap import overlap_statistics  # noqa: E402
from analysis.significance import PairJaccard, bootstrap_relation_means, permutation_test  # noqa: E402
from common.outputs import table  # noqa: E402
from sources.pararel import load_pararel  # noqa: E402


def word(k: int, prefix: str) -> str:
    """An invented capitalised word for the integer k ("Zorvath"-like, never a real name on purpose)."""
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "xi", "ze", "qu", "ba", "do", "fe", "gu", "hy", "jo"]
    parts = [syllables[(k >> (4 * i)) % 16] for i in range(4)]
    return prefix + "".join(parts) + str(k % 7)


ANSWERS = 50  # distinct answers per relation: 27,738 facts have 27,738 subjects and 1,700 answers (< VOCAB words)


def write_folder(root: Path, n_facts: int, n_relations: int, n_patterns: int) -> None:
    """A ParaRel-shaped folder of n_facts invented facts over n_relations relations, ANSWERS answers each."""
    patterns, vocab = root / "graphs_json", root / "trex_lms_vocab"
    patterns.mkdir(parents=True)
    vocab.mkdir()
    for r in range(n_relations):
        name = f"P{1000 + r}"
        with open(patterns / f"{name}.jsonl", "w") as f:
            for k in range(n_patterns):
                f.write(json.dumps({"pattern": f"[X] {word(r * 97 + k, 'vel').lower()} {word(k, 'tor').lower()} [Y] .",
                                    "lemma": "x"}) + "\n")
        with open(vocab / f"{name}.jsonl", "w") as f:
            for k in range(r, n_facts, n_relations):
                answer = word(r * ANSWERS + (k // n_relations) % ANSWERS, "O")  # answers repeat, as in ParaRel
                f.write(json.dumps({"sub_label": word(k, "S"), "obj_label": answer,
                                    "uuid": f"inv-{r}-{k}", "predicate_id": name}) + "\n")


def invented_sets(facts, n_neurons: int, n_layers: int, width: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {f.id: frozenset((int(i // width), int(i % width)) for i in rng.choice(n_layers * width, n_neurons,
                                                                                  replace=False)) for f in facts}


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_size(args: argparse.Namespace) -> None:
    """Runs in the child process: every stage for args.one facts, one JSON line of results on stdout."""
    stages = []

    def stage(name, fn):
        start = time.perf_counter()
        value = fn()
        stages.append([name, time.perf_counter() - start, peak_mb()])
        return value

    with tempfile.TemporaryDirectory() as tmp:
        stage("write ParaRel folder", lambda: write_folder(Path(tmp), args.one, args.relations, args.patterns))
        facts = stage("load_pararel", lambda: load_pararel(tmp))
    sets = stage("invent neuron sets", lambda: invented_sets(facts, args.neurons_per_fact, args.layers, args.width))
    relations = {f.id: f.relation for f in facts}
    stats = stage("overlap_statistics", lambda: overlap_statistics(sets, relations, args.layers))
    pairs = stage("sparse pair entries", lambda: PairJaccard.of(sets, relations))
    perm = stage(f"permutation_test ({args.permutations})",
                 lambda: permutation_test(sets, relations, args.permutations, 0, pairs=pairs))
    stage(f"bootstrap over facts ({args.bootstrap})",
          lambda: bootstrap_relation_means(sets, relations, args.bootstrap, 0, pairs=pairs))
    size = len(json.dumps(stats, allow_nan=False))
    print(json.dumps({"facts": len(facts), "prompts": sum(len(f.prompts) for f in facts), "stages": stages,
                      "nonzero_pairs": int(pairs.upper.nnz), "overlap_json_bytes": size, "p": perm["p_value"]}))


def reference_ratio(args: argparse.Namespace) -> list[list]:
    """Old (pair list) vs new on the same invented sets, seconds each and the ratio."""
    import overlap_reference as reference

    rng = np.random.default_rng(1)
    n = args.reference_facts
    sets = {f"f{k}": frozenset((int(i // args.width), int(i % args.width)) for i in
                               rng.choice(args.layers * args.width, args.neurons_per_fact, replace=False))
            for k in range(n)}
    relations = {f"f{k}": f"P{k % args.relations}" for k in range(n)}

    def old():
        stats = reference.overlap_statistics(sets, relations, args.layers)
        reference.permutation_test(sets, relations, args.permutations, 0)
        for same in (True, False):
            reference.bootstrap_ci([p["jaccard"] for p in stats["pairs"] if p["same_relation"] == same],
                                   args.bootstrap, 0)

    def new():
        overlap_statistics(sets, relations, args.layers, max_pairs_facts=0)
        pairs = PairJaccard.of(sets, relations)
        permutation_test(sets, relations, args.permutations, 0, pairs=pairs)
        bootstrap_relation_means(sets, relations, args.bootstrap, 0, pairs=pairs)

    times = []
    for fn in (old, new):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return [[n, times[0], times[1], times[0] / times[1]]]


VOCAB = 50257  # GPT-2's


def tiny_models(folder: Path, facts_dir: Path) -> dict[str, Path]:
    """Random GPT-2 and Mamba of 3 layers x width 32 with GPT-2's vocabulary size: a word-level tokenizer over
    the folder's words, padded with unused tokens to VOCAB entries."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, MambaConfig, MambaForCausalLM, PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    words = set()
    for file in facts_dir.rglob("*.jsonl"):
        for line in file.read_text().splitlines():
            entry = json.loads(line)
            words.update(w for key in ("pattern", "sub_label", "obj_label") if key in entry  # not the uuids
                         for w, _ in split.pre_tokenize_str(entry[key]))
    words = sorted(words)
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    vocab.update({f"<unused{k}>": k for k in range(len(vocab), VOCAB)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = split
    built = {"gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_layer=3, n_embd=32, n_head=2, n_positions=64)),
             "mamba": MambaForCausalLM(MambaConfig(vocab_size=VOCAB, num_hidden_layers=3, hidden_size=32,
                                                   intermediate_size=64, state_size=8))}
    out = {}
    for arch, model in built.items():
        out[arch] = folder / arch
        model.save_pretrained(out[arch])
        PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]").save_pretrained(out[arch])
    return out


STAGE_LINES = re.compile(r"^(knowledge neurons .* prompts/s|interventions and statistics .* s$|wrote .*)")


def timed_run(command: list[str]) -> tuple[float, list[list]]:
    """Run `command`, timestamping its log lines as they arrive: (wall seconds, [[seconds, stage line]]) for the
    lines that end a stage (STAGE_LINES). Stops with the child's last output when it fails."""
    start, stages, tail = time.perf_counter(), [], []
    with subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True) as child:
        for line in child.stderr:  # progress bars' carriage returns end lines too
            line = line.strip()
            tail = [*tail[-19:], line]
            if STAGE_LINES.match(line):
                stages.append([time.perf_counter() - start, line[:110]])
    if child.returncode:
        raise SystemExit(f"{' '.join(command[:3])} failed:\n" + "\n".join(tail))
    return time.perf_counter() - start, stages


def knowledge_mode(args: argparse.Namespace) -> list:
    """`main.py knowledge` (or --mode) on the invented folder of args.knowledge facts with the tiny models: wall
    time, the child's peak RSS and the JSON sizes; prints when each stage ended."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_folder(root / "pararel", args.knowledge, args.relations, args.patterns)
        models = tiny_models(root / "models", root / "pararel")
        out = args.keep or root / "out"
        command = [sys.executable, str(ROOT / "main.py"), args.mode, "--facts", str(root / "pararel"),
                   "--gpt2-model", str(models["gpt2"]), "--mamba-model", str(models["mamba"]), "--max-prompts-per-fact",
                   "2", "--steps", str(args.steps), "--out", str(out), "--fresh", "--device", "cpu"]
        seconds, stages = timed_run(command)
        print(table(["seconds", "stage ended"], stages))
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        root = out.parent if args.keep else root
        sizes = {p.name: p.stat().st_size / 1e6 for p in out.glob("*.json")}
        sizes |= {p.name: p.stat().st_size / 1e6 for p in out.glob("*.npz")}
        if args.mode == "comprehensive":
            from matplotlib.image import imread

            sides = [max(imread(f).shape[:2]) for f in (out / "figures").glob("*.png")]
            sizes["largest figure side (px)"] = max(sides)
    return [[args.knowledge, args.steps, seconds, peak, ", ".join(f"{k} {v:.1f}" for k, v in sorted(sizes.items()))]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--facts", type=int, nargs="+", default=[1000, 3400, 27738])
    p.add_argument("--relations", type=int, default=34)
    p.add_argument("--patterns", type=int, default=9)
    p.add_argument("--neurons-per-fact", type=int, default=30)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=3072)
    p.add_argument("--permutations", type=int, default=1000)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--reference-facts", type=int, default=300, help="facts of the old-vs-new comparison (default: 300)")
    p.add_argument("--knowledge", type=int, metavar="N",
                   help="instead: time `main.py knowledge` on N invented facts with tiny random GPT-2 and Mamba "
                        "(3 layers x 32, GPT-2's vocabulary), --max-prompts-per-fact 2")
    p.add_argument("--mode", default="knowledge", choices=("knowledge", "comprehensive"),
                   help="the main.py mode --knowledge runs (default: knowledge)")
    p.add_argument("--steps", type=int, default=5, help="integration steps of --knowledge (default: 5)")
    p.add_argument("--keep", type=Path, metavar="DIR", help="--knowledge: write the run's outputs to DIR and keep them")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process of one size
    args = p.parse_args()
    if args.one:
        one_size(args)
        return
    if args.knowledge:
        headers = ["facts", "steps", "seconds", "peak RSS (MB)", "files (MB; largest figure side in px)"]
        print(table(headers, knowledge_mode(args)))
        return
    passed = [x for k in ("relations", "patterns", "neurons_per_fact", "layers", "width", "permutations", "bootstrap")
              for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    for n in args.facts:
        out = subprocess.run([sys.executable, __file__, *passed, "--one", str(n)], check=True, capture_output=True,
                             text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        print(f"\n{result['facts']} facts, {result['prompts']} prompts, {result['nonzero_pairs']} pairs that share "
              f"a neuron (of {result['facts'] * (result['facts'] - 1) // 2}); overlap JSON "
              f"{result['overlap_json_bytes'] / 1e6:.2f} MB")
        print(table(["stage", "seconds", "peak RSS so far (MB)"], result["stages"]))
    print("\nOld (pair list) vs new (sparse blocks), same invented sets, same permutations and resamples")
    print(table(["facts", "old (s)", "new (s)", "old / new"], reference_ratio(args)))


if __name__ == "__main__":
    main()
