"""Which adapter serves which `config.model_type`. Adding an architecture = one module + one line here."""

from __future__ import annotations

from torch import nn

from errors import UserError
from models.base import Adapter
from models.falcon_mamba import FalconMambaAdapter
from models.gpt2 import GPT2Adapter
from models.gpt_neox import GPTNeoXAdapter
from models.mamba import MambaAdapter
from models.mamba2 import Mamba2Adapter

ADAPTERS: dict[str, type[Adapter]] = {
    "gpt2": GPT2Adapter,
    "gpt_neox": GPTNeoXAdapter,
    "mamba": MambaAdapter,
    "falcon_mamba": FalconMambaAdapter,
    "mamba2": Mamba2Adapter,
}


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of a supported causal LM (see `ADAPTERS`); anything else is a user error."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in ADAPTERS:
        raise UserError(f"architecture '{kind}' is not supported: only {', '.join(ADAPTERS)} models are")
    return ADAPTERS[kind](model)
