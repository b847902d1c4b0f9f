"""Time causal tracing on real-shaped models (random weights), the batched path against the hooked reference.

GPT-2-small and Mamba-130M shapes (see bench_attribution.py's SHAPES, saved with a word-level tokenizer and loaded
through the project's loader), the 11-token stand-in prompt, `--samples` noise samples (default 10), window 10;
the three sites of `CausalTracer.trace` each. Prints per model the seconds of the fast path and of the reference
(one hooked full forward per restoration, the noise samples as its batch, as ROME's code), their ratio and the
largest |fast - reference| over the three maps; both run in this process, the fastest of --repeats each.

    python benchmarks/bench_causal_tracing.py [--threads 2] [--archs gpt2 mamba] [--samples 10] [--repeats 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_attribution import ANSWER, PROMPTS, save_model, timed  # noqa: E402

from causal_tracing import SITES, CausalTracer  # noqa: E402
from common.outputs import table  # noqa: E402
from models import load_model  # noqa: E402

SUBJECT = "Eiffel Tower"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--archs", nargs="+", default=["gpt2", "mamba"])
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=None, help="rows per batched forward (default: all)")
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    prompt = PROMPTS[11]
    headers = ["model", "tokens", "samples", "fast s", "reference s", "speed-up", "max |diff|"]
    rows = []
    for arch in args.archs:
        with tempfile.TemporaryDirectory() as folder:
            save_model(arch, Path(folder), [prompt, ANSWER])
            model, tok = load_model(folder, "cpu")
        rows.append(measure(CausalTracer(model, tok), arch, prompt, args))
        print(table(headers, rows[-1:]), flush=True)  # as soon as it is measured: minutes a model on a CPU
    print(table(headers, rows))


def measure(tracer: CausalTracer, arch: str, prompt: str, args: argparse.Namespace) -> list:
    """[arch, tokens, samples, fast s, reference s, speed-up, max |fast - reference|] of one model."""
    kw = dict(samples=args.samples, seed=0, window=args.window, noise=0.1)
    fast, t_fast = timed(lambda: tracer.trace(prompt, ANSWER, SUBJECT, batch_size=args.batch_size, **kw),
                         torch.device("cpu"), args.repeats)
    ref, t_ref = timed(lambda: tracer.trace(prompt, ANSWER, SUBJECT, method="reference", **kw),
                       torch.device("cpu"), args.repeats)
    diff = max((getattr(fast, s) - getattr(ref, s)).abs().max().item() for s in SITES)
    return [arch, len(fast.tokens), args.samples, t_fast, t_ref, t_ref / t_fast, diff]


if __name__ == "__main__":
    main()
