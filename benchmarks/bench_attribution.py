"""Time the staircase (fast) integrated gradients against the reference path, in the same run.

Models have the shapes of GPT-2-small (12 layers x 3072 neurons) and Mamba-130M (24 layers x 1536 neurons) with
random weights (the hub is not needed); timing does not depend on the weights. Prompts are 5 and 11 tokens
long, 11 being the GPT-2 length of "The Eiffel Tower is located in the city of"; each word of the stand-in
prompts is one token. Prints seconds, the speed-up ratio and max |fast - reference| / max |reference|.

    python benchmarks/bench_attribution.py [--threads 1] [--steps 20] [--archs gpt2 mamba] [--device cpu]
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

PROMPTS = {5: "The Eiffel Tower is in", 11: "The Eiffel Tower in France is located in the city of"}


class WordTokenizer:
    """One token per whitespace-separated word (ids from a fixed hash), enough to drive random-weight models."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [sum(map(ord, w)) * 7919 % self.vocab_size for w in text.split()]}


def build(arch: str, device: str):
    from transformers import GPT2Config, GPT2LMHeadModel, MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config())
    else:
        model = MambaForCausalLM(MambaConfig(hidden_size=768, num_hidden_layers=24, vocab_size=50280))
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
    p.add_argument("--archs", nargs="+", default=["gpt2", "mamba"], choices=["gpt2", "mamba"])
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
