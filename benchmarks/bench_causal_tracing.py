"""Time causal tracing on real-shaped models (random weights), the batched path against the hooked reference.

GPT-2-small and Mamba-130M shapes (see bench_attribution.py's SHAPES, saved with a word-level tokenizer and loaded
through the project's loader), the 11-token stand-in prompt, `--samples` noise samples (default 10), window 10;
the three sites of `CausalTracer.trace` each. Prints per model the seconds of the fast path and of the reference
(one hooked full forward per restoration, the noise samples as its batch, as ROME's code), their ratio and the
largest |fast - reference| over the three maps; both run in this process, the fastest of --repeats each.

The reference of the Mamba shape runs transformers' sequential CPU scan in each of its 3 x 24 x 11 forwards and
takes tens of minutes: with --reference-forwards K the reference is K of its forwards (kn_site restorations, the
costliest hooks, cycling over layers and positions), timed, and its total projected as K's seconds x the number
of forwards the whole reference runs (marked "projected"; the difference column is then empty: the fast path
equals the reference in tests/test_causal_tracing.py on every architecture).

    python benchmarks/bench_causal_tracing.py [--threads 2] [--archs gpt2 mamba] [--samples 10] [--repeats 1]
                                              [--reference-forwards K]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_attribution import ANSWER, PROMPTS, save_model, timed  # noqa: E402

from causal_tracing import SITES, CausalTracer  # noqa: E402
from common.allocator import retain_freed_memory  # noqa: E402
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
    p.add_argument("--reference-forwards", type=int, metavar="K",
                   help="time K of the reference's forwards and project its total (default: run it all)")
    args = p.parse_args()
    retain_freed_memory()  # as main.py does
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
    if args.reference_forwards:
        t_ref = projected_reference(tracer, prompt, args.reference_forwards, kw)
        return [arch, len(fast.tokens), args.samples, t_fast, f"{t_ref:.3g} projected", t_ref / t_fast, None]
    ref, t_ref = timed(lambda: tracer.trace(prompt, ANSWER, SUBJECT, method="reference", **kw),
                       torch.device("cpu"), args.repeats)
    diff = max((getattr(fast, s) - getattr(ref, s)).abs().max().item() for s in SITES)
    return [arch, len(fast.tokens), args.samples, t_fast, t_ref, t_ref / t_fast, diff]


def projected_reference(tracer: CausalTracer, prompt: str, k: int, kw: dict) -> float:
    """Seconds of the whole reference trace, projected from k of its hooked forwards (kn_site restorations of
    window layers, the noise samples as the batch): their mean x (1 + the 3 x n_layers x T restorations)."""
    with torch.no_grad():
        run = tracer._corrupted(prompt, ANSWER, SUBJECT, "noise", kw["samples"], kw["seed"], kw["noise"], None)
        L, T, S = tracer.n_layers, len(run.ids), run.samples
        rows = torch.arange(S)
        start = time.perf_counter()
        for i in range(k):
            layer, t = i % L, (i * 7) % T
            tracer._probabilities(run, rows, [(j, "kn_site", rows, torch.full((S,), t))
                                              for j in tracer._layers("kn_site", layer, kw["window"])])
        per_forward = (time.perf_counter() - start) / k
    return per_forward * (1 + len(SITES) * L * T)


if __name__ == "__main__":
    main()
