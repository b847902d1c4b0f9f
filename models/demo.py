"""Offline demo models: a tiny GPT-2 and a tiny Mamba trained on the CPU to know the fact table.

The real GPT-2 and Mamba checkpoints come from the Hugging Face hub; without it (CI, an offline laptop) the
demo models let every analysis run end to end on models that really know the facts. Each is a real
`GPT2LMHeadModel` / `MambaForCausalLM` (a few layers, width 64) with a small byte-level BPE tokenizer trained
on the facts' own text, fitted by full-batch AdamW with teacher forcing on "prompt + answer" until it
predicts every answer token (checked with `demo_accuracy`, which must reach `MIN_ACCURACY`).

Models are cached in `demo_cache_dir()`, one folder per (architecture, fact table, training settings,
library versions): `ensure_demo_models` reuses what exists and builds what is missing, atomically (a temporary
folder beside the final one, renamed into place once complete), so an interrupted build never leaves a
half-written model behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tokenizers
import torch
import torch.nn.functional as F
import transformers
from tokenizers import ByteLevelBPETokenizer
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from common.errors import UserError
from common.tokens import continuation, encode
from facts import FACTS, Fact, facts_hash
from models import load_model, quiet_kernel_advice

log = logging.getLogger(__name__)

MIN_ACCURACY = 0.9
# The demo models (4 layers x 64, a 600-token vocabulary, 50-120 full-batch steps) are sized for a fact table of
# tens of facts (the built-in one has 29); far beyond this they train long and miss MIN_ACCURACY, so --demo stops.
DEMO_MAX_FACTS = 200
INFO_FILE = "demo_info.json"
ENV_CACHE = "KN_DEMO_CACHE"
FORMAT_VERSION = 1  # bump when the training code changes in a way the settings do not show
# One thread: these models are tiny, so two threads gain little on an idle machine and lose badly on a busy one
# (a CI runner); one thread also keeps the result independent of the machine's core count.
TRAIN_THREADS = 1

EOS = "<|endoftext|>"

TRAINING = {"lr": 3e-3, "weight_decay": 0.01, "warmup": 10, "seed": 0, "answer_weight": 1.0, "context_weight": 0.1}
TRAINING_KEYS = ("steps", *TRAINING)  # the other entries of an architecture's settings are its config's

DEMO_SETTINGS: dict[str, Any] = {
    "format": FORMAT_VERSION,
    "tokenizer": {"kind": "byte_level_bpe", "vocab_size": 600, "min_frequency": 1, "add_prefix_space": False,
                  "eos_token": EOS},
    "gpt2": {"n_layer": 4, "n_embd": 64, "n_head": 4, "n_inner": 256, "n_positions": 128,
             "activation_function": "gelu_new", "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
             "steps": 120, **TRAINING},
    "gpt_neox": {"num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 256,
                 "max_position_embeddings": 128, "rotary_pct": 0.25, "use_parallel_residual": True,
                 "hidden_dropout": 0.0, "attention_dropout": 0.0, "tie_word_embeddings": False,
                 "steps": 120, **TRAINING},
    "mamba": {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128, "state_size": 16,
              "conv_kernel": 4, "steps": 50, **TRAINING},
    "falcon_mamba": {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128, "state_size": 16,
                     "conv_kernel": 4, "steps": 50, **TRAINING},
    "mamba2": {"num_hidden_layers": 4, "hidden_size": 64, "expand": 2, "num_heads": 8, "head_dim": 16,
               "n_groups": 1, "state_size": 16, "conv_kernel": 4, "chunk_size": 16, "steps": 50, **TRAINING},
}
CLASSES = {  # architecture -> (config class, model class) of transformers
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"),
    "mamba": ("MambaConfig", "MambaForCausalLM"),
    "falcon_mamba": ("FalconMambaConfig", "FalconMambaForCausalLM"),
    "mamba2": ("Mamba2Config", "Mamba2ForCausalLM"),
}
ARCHS = tuple(CLASSES)
DEFAULT_ARCHS = ("gpt2", "mamba")
HUB_ARCHS = {  # real checkpoints whose architecture a demo model stands in for, offline
    "gpt2": "gpt2", "EleutherAI/pythia-160m": "gpt_neox", "state-spaces/mamba-130m-hf": "mamba",
    "tiiuae/falcon-mamba-7b": "falcon_mamba",
}

# ----------------------------------------------------------------------------------------------------------
# where the models live


def _platform_cache() -> Path:
    """The user's cache folder: XDG on Linux, ~/Library/Caches on macOS, %LOCALAPPDATA% on Windows."""
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = str(Path.home() / "Library" / "Caches")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "knowledge-neurons" / "demo"


def demo_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The folder holding the demo models (created): `cache_dir` > $KN_DEMO_CACHE > the user's cache."""
    if cache_dir is not None:
        path = Path(cache_dir)
    elif os.environ.get(ENV_CACHE):
        path = Path(os.environ[ENV_CACHE])
    else:
        path = _platform_cache()
    path = path.expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot create the demo model cache {path}: {exc} (set ${ENV_CACHE} to another folder)"
        ) from exc
    return path


def _versions() -> dict[str, str]:
    """The library versions a cached model depends on (major.minor where patches do not matter)."""

    def major_minor(version: str) -> str:
        return ".".join(version.split("+")[0].split(".")[:2])

    return {"transformers": major_minor(transformers.__version__), "torch": torch.__version__.split("+")[0],
            "tokenizers": major_minor(tokenizers.__version__)}


def demo_key(arch: str, facts: Sequence[Fact], settings: dict[str, Any] | None = None) -> str:
    """Folder name of the demo model of `arch` for this fact table, settings and library versions."""
    if arch not in ARCHS:
        raise ValueError(f"unknown demo architecture {arch!r} (expected one of {ARCHS})")
    settings = DEMO_SETTINGS if settings is None else settings
    keyed = {"arch": arch, "format": settings.get("format"), "tokenizer": settings["tokenizer"],
             "model": settings[arch], "versions": _versions()}
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode("utf-8")).hexdigest()[:12]
    return f"{arch}-{facts_hash(facts)}-{digest}"


# ----------------------------------------------------------------------------------------------------------
# tokenizer and data


def _texts(facts: Sequence[Fact]) -> list[str]:
    """Every text a run feeds: each prompt followed by its answer, in table order."""
    return [prompt + continuation(prompt, fact.answer) for fact in facts for prompt in fact.prompts]


def build_tokenizer(facts: Sequence[Fact], settings: dict[str, Any] | None = None):
    """A byte-level BPE (GPT-2 style, no prefix space) trained on the facts' text, as a fast HF tokenizer."""
    cfg = (DEMO_SETTINGS if settings is None else settings)["tokenizer"]
    bpe = ByteLevelBPETokenizer(add_prefix_space=cfg["add_prefix_space"])
    bpe.train_from_iterator(_texts(facts), vocab_size=cfg["vocab_size"], min_frequency=cfg["min_frequency"],
                            special_tokens=[cfg["eos_token"]], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=cfg["eos_token"], bos_token=cfg["eos_token"],
                                   pad_token=cfg["eos_token"])


def _batch(tokenizer, facts: Sequence[Fact], answer_weight: float, context_weight: float):
    """All prompts as one right-padded batch: (inputs, targets, weights, attention mask), each (n_prompts, T).

    Sequence = prompt ids + answer ids, tokenized exactly as the analysis does (`tokens.encode`). The targets
    are the next tokens; answer tokens weigh `answer_weight`, other real tokens `context_weight`, pads 0.
    """
    seqs, n_prompt = [], []
    for fact in facts:
        for k, prompt in enumerate(fact.prompts, 1):
            prompt_ids, answer_ids = encode(tokenizer, prompt, fact.answer, f"fact {fact.id!r}, prompt {k}")
            seqs.append(prompt_ids + answer_ids)
            n_prompt.append(len(prompt_ids))
    T = max(len(s) for s in seqs) - 1
    pad = tokenizer.eos_token_id
    inputs = torch.full((len(seqs), T), pad, dtype=torch.long)
    targets = torch.full((len(seqs), T), pad, dtype=torch.long)
    weights = torch.zeros(len(seqs), T)
    for i, (seq, p) in enumerate(zip(seqs, n_prompt, strict=True)):
        n = len(seq) - 1
        inputs[i, :n] = torch.tensor(seq[:-1])
        targets[i, :n] = torch.tensor(seq[1:])
        weights[i, :n] = context_weight
        weights[i, p - 1 : n] = answer_weight  # position p-1 predicts the first answer token
    return inputs, targets, weights, (weights > 0).long()


# ----------------------------------------------------------------------------------------------------------
# models


def _new_model(arch: str, vocab_size: int, eos_id: int, cfg: dict[str, Any]):
    config_class, model_class = (getattr(transformers, name) for name in CLASSES[arch])
    config = {k: v for k, v in cfg.items() if k not in TRAINING_KEYS}
    return model_class(config_class(vocab_size=vocab_size, bos_token_id=eos_id, eos_token_id=eos_id,
                                    pad_token_id=eos_id, **config))


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """Run the block with `n` torch CPU threads, then restore the previous number."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 %."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _train(arch: str, facts: Sequence[Fact], progress: bool = True, settings: dict[str, Any] | None = None):
    """Train the demo model of `arch` on `facts` (CPU, deterministic). Returns (model, tokenizer, seconds)."""
    settings = DEMO_SETTINGS if settings is None else settings
    cfg = settings[arch]
    tokenizer = build_tokenizer(facts, settings)
    inputs, targets, weights, mask = _batch(tokenizer, facts, cfg["answer_weight"], cfg["context_weight"])
    context = cfg.get("n_positions") or cfg.get("max_position_embeddings")
    if context and inputs.shape[1] + 1 > context:
        raise UserError(f"a fact prompt is longer than the demo {arch} model's {context} positions")

    quiet_kernel_advice(torch.device("cpu"))  # training runs on the CPU, where Mamba's CUDA kernels cannot help
    with _threads(TRAIN_THREADS):
        torch.manual_seed(cfg["seed"])
        model = _new_model(arch, len(tokenizer), tokenizer.eos_token_id, cfg)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: _lr_factor(s, cfg["steps"], cfg["warmup"])
        )
        total = weights.sum()
        start = time.perf_counter()
        bar = tqdm(range(cfg["steps"]), desc=f"training demo {arch}", disable=not progress, leave=False)
        for _ in bar:
            logits = model(input_ids=inputs, attention_mask=mask, use_cache=False).logits
            losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
            loss = (losses * weights.flatten()).sum() / total
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        seconds = time.perf_counter() - start
    model.eval().requires_grad_(False)
    log.info("trained demo %s in %.1f s (final loss %.4f)", arch, seconds, loss.item())
    return model, tokenizer, seconds


def demo_accuracy(model, tokenizer, facts: Sequence[Fact]) -> float:
    """Fraction of fact prompts whose every answer token is the model's top-1 next token under teacher forcing."""
    device = next(model.parameters()).device
    hits = total = 0
    with torch.no_grad():
        for fact in facts:
            for k, prompt in enumerate(fact.prompts, 1):
                prompt_ids, answer_ids = encode(tokenizer, prompt, fact.answer, f"fact {fact.id!r}, prompt {k}")
                ids = torch.tensor([prompt_ids + answer_ids[:-1]], device=device)
                logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt_ids) - 1 :]
                hits += bool((logits.argmax(-1).cpu() == torch.tensor(answer_ids)).all())
                total += 1
    return hits / total if total else 0.0


# ----------------------------------------------------------------------------------------------------------
# the cache


def _complete(folder: Path) -> bool:
    return (folder / INFO_FILE).is_file()


def _build(arch: str, facts: Sequence[Fact], folder: Path, progress: bool) -> None:
    """Train, check and save the demo model of `arch` into `folder` (atomically)."""
    log.info("building the demo %s model for %d facts (one-off, cached in %s)", arch, len(facts), folder.parent)
    model, tokenizer, seconds = _train(arch, facts, progress=progress)
    with _threads(TRAIN_THREADS):
        trained_accuracy = demo_accuracy(model, tokenizer, facts)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        loaded, loaded_tokenizer = load_model(str(tmp))  # what the analysis will see
        with _threads(TRAIN_THREADS):
            accuracy = demo_accuracy(loaded, loaded_tokenizer, facts)
        log.info("demo %s: accuracy %.1f %% on %d facts (%.1f %% before saving)",
                 arch, 100 * accuracy, len(facts), 100 * trained_accuracy)
        if accuracy < MIN_ACCURACY:
            raise RuntimeError(
                f"the demo {arch} model reached only {100 * accuracy:.1f} % accuracy on the facts "
                f"(< {100 * MIN_ACCURACY:.0f} %); not saving it. Change DEMO_SETTINGS['{arch}'] (more steps)."
            )
        info = {"arch": arch, "key": folder.name, "settings": {"format": DEMO_SETTINGS["format"],
                "tokenizer": DEMO_SETTINGS["tokenizer"], "model": DEMO_SETTINGS[arch]},
                "facts_hash": facts_hash(facts), "n_facts": len(facts),
                "n_prompts": sum(len(f.prompts) for f in facts), "accuracy": accuracy,
                "accuracy_before_saving": trained_accuracy, "training_seconds": round(seconds, 2),
                "vocab_size": len(tokenizer), "torch": torch.__version__, "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")  # written last
        if folder.exists() and not _complete(folder):
            shutil.rmtree(folder)  # a leftover without its info file
        try:
            os.replace(tmp, folder)
        except OSError:
            if not _complete(folder):  # another process finished first: keep its copy
                raise
            log.info("another process built %s first; using it", folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created) for the block; wait while another process holds it.

    Two runs that share a cache would otherwise both train the same model. Without `fcntl` (Windows) there is
    no lock: both may train, and the atomic rename in `_build` still keeps one complete copy.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that is building %s", path.name.removesuffix(".lock"))
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_demo_models(facts: Sequence[Fact] = FACTS, cache_dir: str | Path | None = None,
                       progress: bool = True, archs: Sequence[str] = DEFAULT_ARCHS) -> dict[str, Path]:
    """{arch: folder} of demo models of `archs` (config.model_type names, see `ARCHS`) that know `facts`;
    builds the missing ones (CPU).

    A model is built under a lock file in the cache folder, so a second run that needs it waits and then reuses it.
    """
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        raise UserError(f"no demo model for {', '.join(unknown)}: demo models exist for {', '.join(ARCHS)}")
    root = demo_cache_dir(cache_dir)
    folders: dict[str, Path] = {}
    for arch in archs:
        folder = root / demo_key(arch, facts)
        if _complete(folder):
            log.info("reusing cached demo model %s", folder)
        else:
            with _locked(root / f".{folder.name}.lock"):
                if _complete(folder):  # another process built it while this one waited
                    log.info("reusing cached demo model %s (built by another process)", folder)
                else:
                    _build(arch, facts, folder, progress)
        folders[arch] = folder
    return folders


def demo_architecture(name: str) -> str | None:
    """The demo architecture that `name` asks for under --demo: an architecture name or a known hub name;
    None for anything else (a local folder keeps its own model)."""
    return name if name in ARCHS else HUB_ARCHS.get(name)


def is_demo_model(path: str | Path) -> bool:
    """Whether `path` is a demo model folder (it holds demo_info.json): a tiny model trained on the fact table."""
    return (Path(path).expanduser() / INFO_FILE).is_file()


def read_info(folder: str | Path) -> dict[str, Any]:
    """The demo_info.json of a demo model folder."""
    return json.loads((Path(folder) / INFO_FILE).read_text(encoding="utf-8"))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for arch_, path_ in ensure_demo_models(cache_dir=sys.argv[1] if len(sys.argv) > 1 else None).items():
        log.info("%s: %s (accuracy %.3f)", arch_, path_, read_info(path_)["accuracy"])
