"""Time the staircase (fast) integrated gradients against the reference path, in the same run.

Models have the shapes of GPT-2-small (12 layers x 3072 neurons), Mamba-130M (24 layers x 1536 neurons), a
Mamba-2 of the 130M size (24 layers, hidden 768, 24 heads x head_dim 64 = 1536 neurons, d_state 128, one group;
SSD chunks of 16 instead of the checkpoints' 256: transformers' torch scan pads every sequence to whole chunks,
so with 256 an 11-token reference is mostly padding, and its backward through 24 layers ran out of 23 GB)
and Falcon-Mamba-7B cut to its first 4 of 64 layers (hidden 4096, 8192 neurons, d_state 16, vocabulary 65024),
with random weights (the hub is not needed); timing does not depend on the weights. Prompts are 5 and 11 tokens
long, 11 being the GPT-2 length of "The Eiffel Tower is located in the city of"; each word of the stand-in
prompts is one token. Prints seconds, the speed-up ratio and max |fast - reference| / max |reference|.

    python benchmarks/bench_attribution.py [--threads 1] [--steps 20] [--archs gpt2 mamba mamba2 falcon_mamba]
                                           [--lengths 5 11] [--device cpu]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from knowledge_neurons import KnowledgeNeurons
from outputs import table

ARCHS = ("gpt2", "mamba", "mamba2", "falcon_mamba")
PROMPTS = {5: "The Eiffel Tower is in", 11: "The Eiffel Tower in France is located in the city of"}


class WordTokenizer:
    """One token per whitespace-separated word (ids from a fixed hash), enough to drive random-weight models."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [sum(map(ord, w)) * 7919 % self.vocab_size for w in text.split()]}


def build(arch: str, device: str):
    import transformers as tf

    torch.manual_seed(0)
    if arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config())
    elif arch == "mamba":
        model = tf.MambaForCausalLM(tf.MambaConfig(hidden_size=768, num_hidden_layers=24, vocab_size=50280))
    elif arch == "mamba2":
        cfg = tf.Mamba2Config(hidden_size=768, num_hidden_layers=24, expand=2, num_heads=24, head_dim=64,
                              state_size=128, n_groups=1, chunk_size=16, vocab_size=50280)
        model = tf.Mamba2ForCausalLM(cfg)
    else:
        cfg = tf.FalconMambaConfig(hidden_size=4096, num_hidden_layers=4, state_size=16, vocab_size=65024)
        model = tf.FalconMambaForCausalLM(cfg)
    model.to(device).eval().requires_grad_(False)
    return KnowledgeNeurons(model, WordTokenizer(model.config.vocab_size))


def timed(kn: KnowledgeNeurons, prompt: str, steps: int, method: str) -> tuple[torch.Tensor, float]:
    """Scores and wall-clock seconds of one attribution."""
    cuda = kn.adapter.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    scores = kn.attribute(prompt, "Paris", steps=steps, method=method)
    if cuda:
        torch.cuda.synchronize()
    return scores, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--steps", type=int, default=20, help="integration steps (default: 20)")
    p.add_argument("--archs", nargs="+", default=["gpt2", "mamba"], choices=ARCHS)
    p.add_argument("--lengths", nargs="+", type=int, default=[5, 11], choices=sorted(PROMPTS))
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    rows = []
    for arch in args.archs:
        kn = build(arch, args.device)
        kn.attribute(PROMPTS[5], "Paris", steps=2)  # warm-up of both paths
        kn.attribute(PROMPTS[5], "Paris", steps=2, method="reference")
        for length in args.lengths:
            assert len(kn.tokenizer(PROMPTS[length])["input_ids"]) == length
            fast, t_fast = timed(kn, PROMPTS[length], args.steps, "fast")
            ref, t_ref = timed(kn, PROMPTS[length], args.steps, "reference")
            diff = ((fast - ref).abs().max() / ref.abs().max()).item()
            rows.append([arch, length, kn.n_layers, t_ref, t_fast, t_ref / t_fast, diff])
            print(table(["model", "tokens", "layers", "reference s", "fast s", "speed-up", "max rel diff"], rows[-1:]))
    print(f"\n{args.device}, {args.threads} thread(s), {args.steps} steps, torch {torch.__version__}")
    print(table(["model", "tokens", "layers", "reference s", "fast s", "speed-up", "max rel diff"], rows))


if __name__ == "__main__":
    main()
