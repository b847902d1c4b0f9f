"""Time `main.py knowledge` under torchrun with 1 rank and with 2 ranks (1 torch thread each), in the same run.

The GPT-2 model has the shapes of GPT-2-small (12 layers x 3072 neurons, 50257-token LM head) with random
weights, saved to a temporary folder with a word-level tokenizer (one token per word) so that `main.py` loads
it like any model; `knowledge` mode also needs a Mamba model, so a tiny one (2 layers) rides along. The facts
are the first 12 of the built-in table (48 prompts, single-token answers). Prints, per run, the wall-clock
time of the whole command (start-up and model loading included) and the GPT-2 stage's time and prompts/s as
logged by rank 0, the speed-ups, the largest score difference between the two runs, and the load average.

    python benchmarks/bench_distributed.py [--facts 12] [--steps 20] [--ranks 1 2]
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

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.scores import load_scores  # noqa: E402
from common.outputs import table  # noqa: E402
from facts import FACTS  # noqa: E402

STAGE = re.compile(r"knowledge neurons gpt2: (\d+) prompts of \d+ facts in ([\d.]+) s on \d+ rank")


def word_tokenizer(texts: list[str], folder: Path):
    """A word-level fast tokenizer over the words of `texts`, saved to `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in split.pre_tokenize_str(t)})
    vocab = {w: i for i, w in enumerate(["[UNK]", "[EOS]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = split
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")
    fast.save_pretrained(folder)
    return fast


def build_models(facts, folder: Path) -> dict[str, Path]:
    """GPT-2-small-shaped and tiny Mamba random models with the word tokenizer, saved under `folder`."""
    from transformers import GPT2Config, GPT2LMHeadModel, MambaConfig, MambaForCausalLM

    texts = [p for f in facts for p in f.prompts] + [f.answer for f in facts]
    torch.manual_seed(0)
    paths = {"gpt2": folder / "gpt2", "mamba": folder / "mamba"}
    tok = word_tokenizer(texts, paths["gpt2"])
    GPT2LMHeadModel(GPT2Config()).save_pretrained(paths["gpt2"])
    word_tokenizer(texts, paths["mamba"])
    mamba = MambaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, state_size=8,
                        vocab_size=len(tok))
    MambaForCausalLM(mamba).save_pretrained(paths["mamba"])
    return paths


def run(ranks: int, models: dict[str, Path], facts_file: Path, out: Path, steps: int) -> tuple[float, float, int]:
    """(wall-clock s of the command, s of the GPT-2 stage, prompts) of one `main.py knowledge` under torchrun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           "main.py", "knowledge", "--gpt2-model", str(models["gpt2"]), "--mamba-model", str(models["mamba"]),
           "--facts", str(facts_file), "--out", str(out), "--steps", str(steps), "--device", "cpu", "--fresh"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{ranks} rank(s) failed:\n{done.stderr[-3000:]}")
    match = STAGE.search(done.stderr)
    return wall, float(match.group(2)), int(match.group(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--facts", type=int, default=12, help="the first N facts of the built-in table (default: 12)")
    p.add_argument("--steps", type=int, default=20, help="integration steps (default: 20)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="rank counts to time (default: 1 2)")
    args = p.parse_args()
    facts = FACTS[: args.facts]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = build_models(facts, tmp / "models")
        facts_file = tmp / "facts.jsonl"
        facts_file.write_text("\n".join(json.dumps({"id": f.id, "relation": f.relation, "subject": f.subject,
                                                    "answer": f.answer, "prompts": list(f.prompts)}) for f in facts))
        load_before = os.getloadavg()
        rows, scores = [], {}
        for ranks in args.ranks:
            wall, stage, prompts = run(ranks, models, facts_file, tmp / f"out{ranks}", args.steps)
            rows.append([ranks, 1, wall, stage, prompts / stage])
            with load_scores(tmp / f"out{ranks}" / "gpt2_knowledge_neurons.json") as npz:  # the file or the shards
                scores[ranks] = {k: npz[k] for k in npz}
            print(table(["ranks", "threads", "command s", "GPT-2 stage s", "prompts/s"], rows[-1:]), flush=True)
        load_after = os.getloadavg()
    base = rows[0]
    for row in rows:
        row += [base[2] / row[2], base[3] / row[3]]
    first = scores[args.ranks[0]]
    diff = max(float(np.abs(first[k] - s[k]).max()) for s in scores.values() for k in first if k.endswith("scores"))
    print(f"\n{len(facts)} facts, {prompts} prompts, {args.steps} steps, GPT-2-small shapes (random weights), CPU, "
          f"torch {torch.__version__}; load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
          f"({os.cpu_count()} cores)")
    print(table(["ranks", "threads", "command s", "GPT-2 stage s", "prompts/s", "speed-up (command)",
                 "speed-up (stage)"], rows))
    print(f"max |score difference| between the runs: {diff:.2e}")


if __name__ == "__main__":
    main()
