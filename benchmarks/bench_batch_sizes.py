"""Prompts per second of `attribute_many` against the number of prompts a batch, with the projected hours for
ParaRel, and the CUDA == CPU agreement of the same numbers: the GPU measurement in one go (gpu_check.sh runs it).

For each architecture (GPT-2-small and Mamba-130M shapes with random weights, saved with a word-level tokenizer
and loaded through the project's loader, as in bench_attribution.py; --shape tiny: 3 layers x 32 with GPT-2's
vocabulary, for a dry run of the plumbing on a CPU) it prints and writes:

- agreement: the scores of --agree prompts on --device and on the CPU, max |device - cpu| / max |cpu|;
- for each --batches B: the fastest of --repeats calls of `attribute_many` on B prompts of --length tokens
  (distinct prompts, --rows (layer, step) rows per pass), seconds a prompt, prompts/s and the hours for
  --prompts prompts (default 253,448: ParaRel's prompts) at that rate. A batch size that runs out of device
  memory is reported as such and the larger ones are skipped.

--out FILE.md gets a Markdown table with the date, device, versions and these rows (for the README's figures
table) and FILE.json the same numbers.

    python benchmarks/bench_batch_sizes.py [--device cuda] [--archs gpt2 mamba] [--batches 8 16 32 64 128 256]
                                           [--shape real|tiny] [--steps 20] [--rows 8192] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_attribution import ANSWER, SUBJECTS, save_model, sync  # noqa: E402
from bench_throughput import save_tiny  # noqa: E402

from common.allocator import retain_freed_memory  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.outputs import table  # noqa: E402
from knowledge_neurons import KnowledgeNeurons  # noqa: E402
from models import load_model  # noqa: E402

PARAREL_PROMPTS = 253_448
WORDS = ["north", "old", "great", "little", "upper", "lower", "east", "west", "new", "high", "far", "near"]
HEADERS = ["model", "device", "prompts a batch", "s a prompt", "prompts/s", "hours for {n:,} prompts"]


def prompts(n: int, length: int) -> list[str]:
    """n distinct prompts of `length` words: "<w1> ... <subject> is located in the city of" shapes."""
    tail = ["is", "located", "in", "the", "city", "of"]
    out = []
    for k in range(n):
        head = [WORDS[(k // len(SUBJECTS) // len(WORDS) ** i) % len(WORDS)] for i in range(max(0, length - 7))]
        out.append(" ".join(["The", *head, SUBJECTS[k % len(SUBJECTS)], *tail][-length:]))
    return out


def texts(length: int, most: int) -> list[str]:
    return [*prompts(most, length), ANSWER]


def agreement(folder: Path, device: torch.device, n: int, args) -> float:
    """max |scores on device - scores on the CPU| / max |CPU scores| over n prompts."""
    items = [(p, ANSWER) for p in prompts(n, args.length)]
    scores = []
    for where in (device, torch.device("cpu")):
        model, tokenizer = load_model(str(folder), where)
        scores.append(torch.stack([r.scores for r in KnowledgeNeurons(model, tokenizer).attribute_many(
            items, steps=args.steps, batch_size=args.rows)]))
        del model
    return ((scores[0] - scores[1]).abs().max() / scores[1].abs().max()).item()


def rates(folder: Path, arch: str, device: torch.device, args) -> list[list]:
    """One row of HEADERS per batch size (until the device runs out of memory)."""
    model, tokenizer = load_model(str(folder), device)
    kn = KnowledgeNeurons(model, tokenizer)
    kn.attribute_many([(p, ANSWER) for p in prompts(2, args.length)], steps=2)  # warm-up
    rows = []
    for b in args.batches:
        items = [(p, ANSWER) for p in prompts(b, args.length)]
        best = float("inf")
        try:
            for _ in range(args.repeats):
                sync(device)
                start = time.perf_counter()
                kn.attribute_many(items, steps=args.steps, batch_size=args.rows)
                sync(device)
                best = min(best, time.perf_counter() - start)
        except UserError as exc:  # out of device memory: a measured limit, reported, the larger sizes skipped
            logging.warning("%s, %d prompts a batch: %s", arch, b, exc)
            rows.append([arch, device.type, b, "out of memory", None, None])
            break
        rate = b / best
        rows.append([arch, device.type, b, best / b, rate, args.prompts / rate / 3600])
        print(table([h.format(n=args.prompts) for h in HEADERS], rows[-1:]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda[:N] | cpu (default: cuda)")
    p.add_argument("--archs", nargs="+", default=["gpt2", "mamba"], choices=["gpt2", "mamba"])
    p.add_argument("--batches", nargs="+", type=int, default=[8, 16, 32, 64, 128, 256])
    p.add_argument("--shape", default="real", choices=["real", "tiny"],
                   help="real: GPT-2-small / Mamba-130M shapes; tiny: 3 layers x 32 (a dry run) (default: real)")
    p.add_argument("--length", type=int, default=11, help="prompt tokens (default: 11)")
    p.add_argument("--steps", type=int, default=20, help="integration steps (default: 20)")
    p.add_argument("--rows", type=int, default=8192, help="(layer, step) rows per pass (default: 8192)")
    p.add_argument("--repeats", type=int, default=2, help="calls per batch size, the fastest kept (default: 2)")
    p.add_argument("--agree", type=int, default=2, help="prompts of the CUDA == CPU check (default: 2; 0: skip)")
    p.add_argument("--prompts", type=int, default=PARAREL_PROMPTS, help="prompts to project hours for")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, help="write the table here (Markdown) and beside it as .json")
    args = p.parse_args()
    retain_freed_memory()  # as main.py does
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    headers = [h.format(n=args.prompts) for h in HEADERS]
    rows, agree = [], {}
    for arch in args.archs:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            words = texts(args.length, max(args.batches))
            if args.shape == "tiny":
                save_tiny(arch, folder, words)
            else:
                save_model(arch, folder, words)
            if args.agree:
                agree[arch] = agreement(folder, device, args.agree, args)
                print(f"{arch}: max |{device.type} - cpu| / max |cpu| = {agree[arch]:.2e} ({args.agree} prompts)",
                      flush=True)
            rows += rates(folder, arch, device, args)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    about = (f"{date}, {name}, torch {torch.__version__}, {args.shape} shapes, {args.length}-token prompts, "
             f"{args.steps} steps, {args.rows} rows a pass")
    print(f"\n{about}")
    print(table(headers, rows))
    if args.out:
        md = [f"Measured {about}.", "", "| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
        md += ["| " + " | ".join("-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v) for v in r)
               + " |" for r in rows]
        md += ["", "CUDA == CPU (max |device - cpu| / max |cpu| of the scores): "
               + (", ".join(f"{a} {e:.2e}" for a, e in agree.items()) or "not checked")]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(md) + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(
            {"about": about, "device": name, "headers": headers, "rows": rows, "agreement": agree}, indent=1))


if __name__ == "__main__":
    main()
