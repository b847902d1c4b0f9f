"""Time integrated gradients on real-shaped models, against the references, in one run.

Models have the shapes of GPT-2-small (12 layers x 3072 neurons) and Mamba-130M (24 layers x 1536 neurons), and
with --archs also of Pythia-160M (gpt_neox: 12 layers x 3072 neurons, rotary on a quarter of each head),
with --archs also of a Mamba-2 of the 130M size (24 layers, hidden 768, 24 heads x head_dim 64 = 1536 neurons,
d_state 128, one group; SSD chunks of 16 instead of the checkpoints' 256: transformers' torch scan pads every
sequence to whole chunks, so with 256 an 11-token reference is mostly padding, and its backward through 24 layers
ran out of 23 GB) and of Falcon-Mamba-7B cut to its first 4 of 64 layers (hidden 4096, 8192 neurons, d_state 16,
vocabulary 65024), with random weights (no hub needed; timing does not depend on the weights), saved with a
word-level tokenizer and loaded through the project's loader. Stand-in prompts have one token per word; 11 tokens
is the GPT-2 length of "The Eiffel Tower is located in the city of". For every model and prompt length it
prints (every time the fastest of --repeats runs, default 2: a shared machine drifts by 10 %):

- fast: the staircase, one prompt at a time; reference: one hooked full forward + backward of the scaled
  copies per layer (as the EleutherAI package does it), the speed-up and max |fast - ref| / max |ref|; fast,
  reference and EleutherAI (below) take turns, --repeats rounds, and each keeps its fastest;
- batched: `attribute_many` on --batch prompts at once vs the same prompts one at a time, alternated --repeats
  times and the fastest of each kept (per-prompt seconds, prompts/s, speed-up, max relative difference), and
  the projected hours for 250,000 prompts;
- eleuther (GPT-2 only, unless --no-eleuther): EleutherAI `knowledge-neurons` 0.0.2 `get_scores` on the same
  model and prompt, run in a subprocess with that package installed on its own (pip --target) under
  benchmarks/.eleuther, so its `knowledge_neurons` module does not meet ours.

    python benchmarks/bench_attribution.py [--threads 1] [--steps 20] [--archs gpt2 gpt_neox mamba mamba2 falcon_mamba]
                                           [--lengths 5 11] [--batch 8] [--repeats 2] [--no-eleuther]
                                           [--device cpu] [--allocator retain|default]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.allocator import ALLOCATORS, retain_freed_memory, setting  # noqa: E402
from common.outputs import table  # noqa: E402
from knowledge_neurons import KnowledgeNeurons  # noqa: E402
from models import load_model  # noqa: E402

PROMPTS = {5: "The Eiffel Tower is in", 11: "The Eiffel Tower in France is located in the city of"}
SUBJECTS = ["Eiffel", "Louvre", "Colosseum", "Kremlin", "Parthenon", "Alhambra", "Acropolis", "Pantheon"]
ANSWER = "Paris"
PARAREL_PROMPTS = 250_000
ELEUTHER = "knowledge-neurons==0.0.2"
ELEUTHER_DIR = ROOT / "benchmarks" / ".eleuther"
SHAPES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {  # Pythia-160M
        "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
        "rotary_pct": 0.25, "vocab_size": 50304, "tie_word_embeddings": False}),
    "mamba": ("MambaConfig", "MambaForCausalLM", {"hidden_size": 768, "num_hidden_layers": 24, "vocab_size": 50280}),
    "mamba2": ("Mamba2Config", "Mamba2ForCausalLM", {"hidden_size": 768, "num_hidden_layers": 24, "expand": 2,
                                                     "num_heads": 24, "head_dim": 64, "state_size": 128,
                                                     "n_groups": 1, "chunk_size": 16, "vocab_size": 50280}),
    "falcon_mamba": ("FalconMambaConfig", "FalconMambaForCausalLM", {"hidden_size": 4096, "num_hidden_layers": 4,
                                                                     "state_size": 16, "vocab_size": 65024}),
}


def batch_prompts(length: int, n: int) -> list[str]:
    """n distinct prompts of `length` words (the stand-in prompt with another landmark)."""
    base = PROMPTS[length]
    return [base.replace("Eiffel", SUBJECTS[k % len(SUBJECTS)]) for k in range(n)]


def save_model(arch: str, folder: Path, texts: list[str] | None = None) -> None:
    """A random model of the real shapes and a word-level tokenizer over the words of `texts` (default: the
    stand-in prompts and answer), saved to `folder`."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    config_cls, model_cls, kwargs = SHAPES[arch]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs))
    texts = texts if texts is not None else [*PROMPTS.values(), *SUBJECTS, ANSWER]
    split = pre_tokenizers.Whitespace()  # words and punctuation marks
    words = sorted({w for text in texts for w, _ in split.pre_tokenize_str(text)})
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = split
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]").save_pretrained(folder)
    model.save_pretrained(folder)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int = 1):
    """(result, wall-clock seconds) of fn(): the fastest of `repeats` calls (a shared machine drifts by 10 %)."""
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return out, best


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def eleuther_seconds(folder: Path, prompt: str, steps: int, threads: int, repeats: int) -> float:
    """Seconds of EleutherAI `get_scores` (all steps in one batch, its fastest setting) in a clean subprocess: the
    fastest of `repeats` calls."""
    if not (ELEUTHER_DIR / "knowledge_neurons").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(ELEUTHER_DIR),
                        ELEUTHER, "einops"], check=True)
    worker = f"""
import json, time, torch
from transformers import AutoTokenizer, GPT2LMHeadModel
from knowledge_neurons.knowledge_neurons import KnowledgeNeurons
torch.set_num_threads({threads})
tok = AutoTokenizer.from_pretrained({str(folder)!r})
model = GPT2LMHeadModel.from_pretrained({str(folder)!r}).eval()
kn = KnowledgeNeurons(model, tok, model_type="gpt2", device="cpu")
kn.get_scores({prompt!r}, {ANSWER!r}, batch_size=2, steps=2, pbar=False)  # warm-up
best = float("inf")
for _ in range({repeats}):
    start = time.perf_counter()
    kn.get_scores({prompt!r}, {ANSWER!r}, batch_size={steps}, steps={steps}, pbar=False)
    best = min(best, time.perf_counter() - start)
print(json.dumps(best))
"""
    env = {**os.environ, "PYTHONPATH": str(ELEUTHER_DIR)}
    with tempfile.TemporaryDirectory() as cwd:  # not the repository: our knowledge_neurons.py must not shadow theirs
        done = subprocess.run([sys.executable, "-c", worker], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"EleutherAI get_scores failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_model(arch: str, args, device: torch.device, folder: Path) -> tuple[list, list]:
    """Rows of the single-prompt table and of the batched table for one architecture."""
    model, tokenizer = load_model(str(folder), device)
    kn = KnowledgeNeurons(model, tokenizer)
    kn.attribute(PROMPTS[5], ANSWER, steps=2)  # warm-up of both paths
    kn.attribute(PROMPTS[5], ANSWER, steps=2, method="reference")
    single, batched = [], []
    for length in args.lengths:
        prompt = PROMPTS[length]
        assert len(tokenizer(prompt)["input_ids"]) == length
        t_fast = t_ref = t_eleuther = float("inf")
        eleuther = arch == "gpt2" and args.eleuther and device.type == "cpu"
        for _ in range(args.repeats):  # the paths alternate, so that each sees the machine's every state
            fast, t = timed(lambda p=prompt: kn.attribute(p, ANSWER, steps=args.steps), device)
            t_fast = min(t_fast, t)
            ref, t = timed(lambda p=prompt: kn.attribute(p, ANSWER, steps=args.steps, method="reference"), device)
            t_ref = min(t_ref, t)
            if eleuther:
                t_eleuther = min(t_eleuther, eleuther_seconds(folder, prompt, args.steps, args.threads, 1))
        t_eleuther = t_eleuther if eleuther else None
        single.append([arch, length, t_ref, t_fast, t_ref / t_fast, rel(fast, ref), t_eleuther,
                       t_eleuther / t_fast if t_eleuther else None])
        print(table(SINGLE, single[-1:]), flush=True)

        items = [(p, ANSWER) for p in batch_prompts(length, args.batch)]
        t_alone, t_many = float("inf"), float("inf")
        for _ in range(args.repeats):  # alternating, the fastest of each
            alone, t = timed(lambda it=items: [kn.attribute(p, a, steps=args.steps) for p, a in it], device)
            t_alone = min(t_alone, t)
            together, t = timed(lambda it=items: kn.attribute_many(it, steps=args.steps), device)
            t_many = min(t_many, t)
        diff = max(rel(b.scores, a) for a, b in zip(alone, together, strict=True))
        rate = len(items) / t_many
        batched.append([arch, length, len(items), t_alone / len(items), t_many / len(items), t_alone / t_many,
                        rate, PARAREL_PROMPTS / rate / 3600, diff])
        print(table(BATCHED, batched[-1:]), flush=True)
    return single, batched


SINGLE = ["model", "tokens", "reference s", "fast s", "speed-up", "max rel diff", "EleutherAI s", "vs EleutherAI"]
BATCHED = ["model", "tokens", "prompts", "one-by-one s/prompt", "batched s/prompt", "speed-up", "prompts/s",
           "hours for 250k prompts", "max rel diff"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--steps", type=int, default=20, help="integration steps (default: 20)")
    p.add_argument("--archs", nargs="+", default=["gpt2", "mamba"], choices=list(SHAPES),
                   help="models to time (default: gpt2 mamba)")
    p.add_argument("--lengths", nargs="+", type=int, default=[5, 11], choices=sorted(PROMPTS))
    p.add_argument("--batch", type=int, default=8, help="prompts per attribute_many call (default: 8)")
    p.add_argument("--repeats", type=int, default=2,
                   help="time everything this many times and keep the fastest (batched and one at a time "
                        "alternate) (default: 2)")
    p.add_argument("--no-eleuther", dest="eleuther", action="store_false",
                   help="skip the EleutherAI knowledge-neurons timing (GPT-2 on CPU only)")
    p.add_argument("--device", default="cpu", help="cpu | cuda[:N] (default: cpu)")
    p.add_argument("--allocator", default="retain", choices=ALLOCATORS,
                   help="this process's allocator setting, as main.py's --allocator (default: retain, as main.py); "
                        "the EleutherAI subprocess keeps the C library's own")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.allocator == "retain":
        retain_freed_memory()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    single, batched = [], []
    for arch in args.archs:
        with tempfile.TemporaryDirectory() as folder:
            save_model(arch, Path(folder))
            s, b = bench_model(arch, args, device, Path(folder))
        single += s
        batched += b
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"\n{name}, {args.steps} steps, torch {torch.__version__}, allocator {setting()}")
    print(table(SINGLE, single))
    print()
    print(table(BATCHED, batched))


if __name__ == "__main__":
    main()
