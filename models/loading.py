"""Loading a causal LM, its config and its tokenizer from a local folder or the Hugging Face hub."""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from common.errors import UserError
from models.registry import ADAPTERS

DEVICES = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
# transformers' advice to install the CUDA kernels of Mamba (mamba_ssm, causal_conv1d): 5.x logs it from the
# kernel fallback, 4.x from the Mamba module
_KERNEL_ADVICE_LOGGERS = ("transformers.integrations.hub_kernels", "transformers.models.mamba.modeling_mamba")


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything but auto / cpu / cuda[:N], or a GPU that torch does
    not see, is a user error."""
    if not _DEVICE.fullmatch(device):
        raise UserError(f"--device {device}: not a device; choose {DEVICES}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is available to torch here; use --device cpu")
        index, count = int(device.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            raise UserError(f"--device {device}: torch sees {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return torch.device(device)


def looks_like_path(name: str) -> bool:
    """A model name meant as a folder: absolute, starting with . or ~, or with more separators than a hub id
    ("org/name") has."""
    return name.startswith((".", "~", os.sep, "/")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _from_pretrained(load: Callable[..., Any], name: str, **kwargs) -> Any:
    """`load(source, ...)` from the local folder or local hub cache first; from the hub only when it answers.

    A name that is meant as a folder but does not exist, an unloadable folder and an unreachable hub model are
    user errors that say so.
    """
    local = Path(name).expanduser()
    if not local.exists() and looks_like_path(name):
        raise UserError(f"model '{name}': no such folder ({local.absolute()})")
    if local.exists() and not local.is_dir():
        raise UserError(f"model '{name}': {local} is a file; pass the folder that holds config.json")
    source = str(local) if local.exists() else name
    try:
        try:
            return load(source, local_files_only=True, **kwargs)
        except OSError:
            if local.exists() or not _hub_reachable():
                raise
            return load(source, **kwargs)
    except (OSError, ValueError) as exc:
        if local.exists():
            raise UserError(f"model '{name}': cannot load the folder {local}: {exc}") from exc
        raise UserError(
            f"model '{name}' is not a local folder and the Hugging Face hub cannot provide it "
            "(no network and not in the local cache): pass the path of a downloaded copy "
            "(--gpt2-model PATH / --mamba-model PATH) or use --demo for the built-in demo models"
        ) from exc


def load_config(name: str):
    """The model's config (no weights), from a local folder or the hub; an unsupported architecture is an error."""
    from transformers import AutoConfig

    config = _from_pretrained(AutoConfig.from_pretrained, name)
    if config.model_type not in ADAPTERS:
        raise UserError(f"model '{name}' is a '{config.model_type}' model; only {', '.join(ADAPTERS)} are supported")
    return config


def load_tokenizer(name: str):
    """The model's tokenizer, from a local folder or the hub."""
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer.from_pretrained, name)


class _KernelAdvice(logging.Filter):
    """Drops transformers' advice to install mamba_ssm / causal_conv1d: those are CUDA kernels, so on a CPU
    the advice is noise (the PyTorch path it falls back to is the one that runs there)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("install" in text and any(k in text for k in ("mamba_ssm", "causal_conv1d", "causal-conv1d")))


_KERNEL_ADVICE = _KernelAdvice()


def quiet_kernel_advice(device: torch.device) -> None:
    """Silence the advice to install Mamba's CUDA kernels unless models run on a GPU, where it is useful."""
    for name in _KERNEL_ADVICE_LOGGERS:
        logger = logging.getLogger(name)
        if device.type == "cuda":
            logger.removeFilter(_KERNEL_ADVICE)
        else:
            logger.addFilter(_KERNEL_ADVICE)


def load_model(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a GPT-2 or Mamba causal LM and its tokenizer from a local folder or the Hugging Face hub.

    Tries the local folder / local hub cache first; goes to the hub only when it answers. The model is put in
    eval mode (the CUDA Mamba kernels fuse `out_proj` away in training mode) with gradients off for weights.
    Returns (model, tokenizer).
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars are over facts; per-file bars are noise
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    load_config(name)  # a clear error for an unsupported architecture before the weights are read
    tokenizer = load_tokenizer(name)
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, name, dtype=dtype)
    quiet_kernel_advice(device)
    model.to(device)
    model.eval().requires_grad_(False)
    return model, tokenizer
