"""Loading a causal LM and its tokenizer from a local folder or the Hugging Face hub."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from errors import UserError
from models.registry import ADAPTERS


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is available to torch here; use --device cpu")
    return torch.device(device)


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def load_model(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a GPT-2 or Mamba causal LM and its tokenizer from a local folder or the Hugging Face hub.

    Tries the local folder / local hub cache first; goes to the hub only when it answers. The model is put in
    eval mode (the CUDA Mamba kernels fuse `out_proj` away in training mode) with gradients off for weights.
    Returns (model, tokenizer).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars are over facts; per-file bars are noise
    local = Path(name).expanduser()
    source = str(local) if local.exists() else name
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=True)
        except OSError:
            if local.exists() or not _hub_reachable():
                raise
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as exc:
        if local.exists():
            raise UserError(f"model '{name}': cannot load the folder {local}: {exc}") from exc
        raise UserError(
            f"model '{name}' is not a local folder and the Hugging Face hub cannot provide it "
            "(no network and not in the local cache): pass the path of a downloaded copy "
            "(--gpt2-model PATH / --mamba-model PATH) or use --demo for the built-in demo models"
        ) from exc
    if model.config.model_type not in ADAPTERS:
        kind = model.config.model_type
        raise UserError(f"model '{name}' is a '{kind}' model; only {', '.join(ADAPTERS)} are supported")
    model.to(resolve_device(str(device)) if isinstance(device, str) else device)
    model.eval().requires_grad_(False)
    return model, tokenizer


