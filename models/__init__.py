"""Model loading and the per-architecture adapters: the only package that knows one architecture from another.

A "neuron" of layer l is one unit of the input of the block's output projection (see each architecture's
module). `base.Adapter` is the interface method code uses; `registry.ADAPTERS` maps `config.model_type` to
its adapter; `loading.load_model` loads a model and tokenizer from a folder or the hub (`load_config` and
`load_tokenizer` read the parts without the weights).
"""

from models.base import Adapter, Prefix
from models.gpt2 import GPT2Adapter
from models.loading import load_config, load_model, load_tokenizer, quiet_kernel_advice, resolve_device
from models.mamba import MambaAdapter, SSMInputs
from models.registry import ADAPTERS, adapter_for

__all__ = ["ADAPTERS", "Adapter", "GPT2Adapter", "MambaAdapter", "Prefix", "SSMInputs", "adapter_for",
           "load_config", "load_model", "load_tokenizer", "quiet_kernel_advice", "resolve_device"]
