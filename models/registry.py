"""Which adapter serves which `config.model_type`. Adding an architecture = one module + one line here."""

from __future__ import annotations

from importlib.metadata import version

from torch import nn

from common.errors import UserError
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
# Their adapters read module attributes that transformers 4.x names otherwise or lacks (e.g. Falcon-Mamba's
# dt_layernorm, the gated norm's group_size); tested with transformers 5.24.
NEEDS_TRANSFORMERS_5 = ("mamba2", "falcon_mamba")


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of a supported causal LM (see `ADAPTERS`); anything else is a user error."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in ADAPTERS:
        raise UserError(f"architecture '{kind}' is not supported: only {', '.join(ADAPTERS)} models are")
    if kind in NEEDS_TRANSFORMERS_5 and int(version("transformers").split(".")[0]) < 5:
        raise UserError(f"{kind} models need transformers 5 (this is {version('transformers')}): "
                        "pip install -U 'transformers>=5,<6'")
    return ADAPTERS[kind](model)
