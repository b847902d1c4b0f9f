"""Model loading and the per-architecture adapters: the only package that knows one architecture from another.

A "neuron" of layer l is one unit of the input of the block's output projection (see each architecture's
module). `base.Adapter` is the interface method code uses; `registry.ADAPTERS` maps `config.model_type` to
its adapter; `loading.load_model` loads a model and tokenizer from a folder or the hub (`load_config` and
`load_tokenizer` read the parts without the weights); `demo` trains the tiny offline demo models (imported by
name, not re-exported here: it needs the fact table).

May import `common` and, in `demo` only, the top-level `facts` module; never a method module or a package above.
"""

from models.base import Adapter, Prefix, eval_mode
from models.falcon_mamba import FalconMambaAdapter
from models.gpt2 import GPT2Adapter
from models.loading import load_config, load_model, load_tokenizer, quiet_kernel_advice, resolve_device
from models.mamba import MambaAdapter
from models.mamba2 import Mamba2Adapter
from models.registry import ADAPTERS, adapter_for
from models.ssm import SSMAdapter, SSMInputs

__all__ = [
           "ADAPTERS",
           "Adapter",
           "FalconMambaAdapter",
           "GPT2Adapter",
           "Mamba2Adapter",
           "MambaAdapter",
           "Prefix",
           "SSMAdapter",
           "SSMInputs",
           "adapter_for",
           "eval_mode",
           "load_config",
           "load_model",
           "load_tokenizer",
           "quiet_kernel_advice",
           "resolve_device",
]
