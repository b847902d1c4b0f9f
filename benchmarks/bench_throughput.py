"""Prompts per second of `python main.py knowledge` on tiny random models, this checkout against another.

The models are random GPT-2 and Mamba of 3 layers x 32 (GPT-2: 4 heads, 128 neurons; Mamba: 64 neurons,
d_state 16) with GPT-2's 50,257-token vocabulary, so the arithmetic is small and the LM head is real-sized: what
is timed is mostly the cost per prompt that is not matrix products (Python, small kernels, padding). The facts
are invented, ParaRel-style (--facts facts of 17 relations, two cloze templates each), and a word-level
tokenizer over their words gives one token per word. Each checkout runs `main.py knowledge --facts FILE
--gpt2-model ... --mamba-model ... --fresh` in a subprocess with --threads threads (the same models and facts),
--repeats times alternating, and the fastest run of each is kept; the table gives each model's attribution
stage (the stage's own "prompts/s" log line), the whole run's wall time and prompts/s end to end (prompts x
models / wall time), and the ratio this checkout / --code. The reference is another checkout, e.g. of main:

    git worktree add /tmp/base main
    python benchmarks/bench_throughput.py --code /tmp/base [--facts 680] [--threads 2] [--steps 20] [--repeats 1]
                                          [-- extra main.py options of this checkout, e.g. --prompts-per-batch 64]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.outputs import table  # noqa: E402

RELATIONS = [  # (relation, two templates whose {} is the subject; each ends where the answer begins)
    ("born_in", "{} was born in", "The birthplace of {} is"), ("capital_of", "The capital of {} is", "{}'s capital is"),
    ("located_in", "{} is located in", "{} can be found in"), ("works_for", "{} works for", "{} is employed by"),
    ("speaks", "The native language of {} is", "{} speaks"), ("plays", "{} plays the", "The instrument of {} is the"),
    ("member_of", "{} is a member of", "{} belongs to"), ("founded_by", "{} was founded by", "The founder of {} is"),
    ("made_by", "{} is produced by", "{} is made by"), ("citizen_of", "{} is a citizen of", "{} holds a passport of"),
    ("genre_of", "The genre of {} is", "{} plays music of the genre"), ("died_in", "{} died in", "{} passed away in"),
    ("religion", "The religion of {} is", "{} follows the religion of"), ("position", "{} plays as a",
                                                                        "The position of {} is"),
    ("field_of", "{} works in the field of", "The field of {} is"), ("named_after", "{} is named after",
                                                                      "{} was named for"),
    ("twinned_with", "{} is a twin city of", "The sister city of {} is"),
]
SYLLABLES = ["ka", "lo", "mi", "ren", "tus", "vor", "zel", "qui", "bran", "dor", "fen", "gal", "hin", "jor", "nix"]


def invented_facts(n: int) -> list[dict]:
    """n facts, round-robin over RELATIONS, with invented subject and answer words (deterministic)."""
    def word(k: int, parts: int) -> str:
        syl = [SYLLABLES[(k // len(SYLLABLES) ** i) % len(SYLLABLES)] for i in range(parts)]
        return "".join(syl).capitalize()

    facts = []
    for k in range(n):
        relation, *templates = RELATIONS[k % len(RELATIONS)]
        subject = word(k, 3) + (" " + word(k * 7 + 3, 2) if k % 3 == 0 else "")  # some two-word subjects
        facts.append({"id": f"f{k}", "relation": relation, "subject": subject, "answer": word(k * 11 + 5, 2) + "ton",
                      "prompts": [t.format(subject) for t in templates]})
    return facts


def save_tiny(arch: str, folder: Path, texts: list[str]) -> None:
    """A random 3-layer model of width 32 with GPT-2's vocabulary and a word-level tokenizer over `texts`."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    if arch == "gpt2":
        config = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=4, n_inner=128, vocab_size=50257)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.MambaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64, state_size=16,
                                          vocab_size=50257)
        model = transformers.MambaForCausalLM(config)
    split = pre_tokenizers.Whitespace()
    words = sorted({w for text in texts for w, _ in split.pre_tokenize_str(text)})
    core = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    core.pre_tokenizer = split
    transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]").save_pretrained(folder)
    model.save_pretrained(folder)


STAGE = re.compile(r"knowledge neurons (.+?): (\d+) prompts of \d+ facts in ([\d.]+) s .*?: ([\d.]+) prompts/s")


def run(code: Path, tmp: Path, args, extra: list[str]) -> dict:
    """One `main.py knowledge` run of checkout `code`: {"wall": s, model label: stage prompts/s}."""
    cmd = [sys.executable, str(code / "main.py"), "knowledge", "--facts", str(tmp / "facts.jsonl"),
           "--gpt2-model", str(tmp / "gpt2"), "--mamba-model", str(tmp / "mamba"), "--out", str(tmp / "out"),
           "--steps", str(args.steps), "--fresh", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{code}: main.py knowledge failed:\n{done.stderr[-3000:]}")
    rates = {m[1].lower().replace("-", ""): float(m[4]) for m in STAGE.finditer(done.stderr)}  # GPT-2 or gpt2
    return {"wall": wall, **rates}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--code", type=Path, required=True, help="the reference checkout (e.g. a worktree of main)")
    p.add_argument("--facts", type=int, default=680, help="invented facts, two prompts each (default: 680)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads of each run (default: 2)")
    p.add_argument("--steps", type=int, default=20, help="integration steps (default: 20)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each checkout, alternating (default: 1)")
    p.add_argument("extra", nargs="*", help="more main.py options for this checkout only, after --")
    args = p.parse_args()
    facts = invented_facts(args.facts)
    n_prompts = sum(len(f["prompts"]) for f in facts)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "facts.jsonl").write_text("".join(json.dumps(f) + "\n" for f in facts))
        texts = [t for f in facts for t in (*f["prompts"], f["answer"])]
        for arch in ("gpt2", "mamba"):
            save_tiny(arch, tmp / arch, texts)
        best: dict[str, dict] = {}
        for _ in range(args.repeats):
            for name, code, extra in (("this", ROOT, args.extra), ("reference", args.code, [])):
                r = run(code, tmp, args, extra)
                if name not in best or r["wall"] < best[name]["wall"]:
                    best[name] = r
    load = os.getloadavg()
    rows = []
    for key, name in (("gpt2", "GPT-2 stage"), ("mamba", "Mamba stage"), ("wall", "end to end")):
        this, ref = best["this"].get(key), best["reference"].get(key)
        if key == "wall":
            this, ref = 2 * n_prompts / this, 2 * n_prompts / ref  # prompts x models / wall time
        rows.append([name, ref, this,
                     this / ref if this and ref else None])
    commit = subprocess.run(["git", "-C", str(args.code), "log", "-1", "--format=%h %s"], capture_output=True,
                            text=True).stdout.strip()
    print(f"\n{args.facts} invented facts, {n_prompts} prompts, 2 models, {args.steps} steps, {args.threads} "
          f"thread(s), fastest of {args.repeats}; load average at the end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
          f"on {os.cpu_count()} cores")
    print(f"reference: {args.code} ({commit[:70]})")
    print(table(["prompts/s", "reference", "this checkout", "ratio"], rows))


if __name__ == "__main__":
    main()
