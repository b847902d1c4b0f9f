"""Shared fixtures: tiny random GPT-2, GPT-NeoX, Mamba, Mamba-2 and Falcon-Mamba models, saved and loaded back
through the project's loader."""

from __future__ import annotations

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    FalconMambaConfig,
    FalconMambaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    PreTrainedTokenizerFast,
)

from models import load_model

CORPUS = [
    "The capital of France is Paris. The Eiffel Tower is located in the city of Paris.",
    "The longest river in China is the Yangtze. The chemical formula of water is H2O.",
]


def _tokenizer(folder) -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(
        CORPUS, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"], show_progress=False
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    tok.save_pretrained(folder)
    return tok


def _save_and_load(model, folder):
    tok = _tokenizer(folder)
    model.config.vocab_size = len(tok)
    model.save_pretrained(folder)
    return load_model(str(folder))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """(model, tokenizer): 3 layers, n_embd 32, 64 neurons a layer; large init makes GELU visibly non-linear."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    cfg = GPT2Config(n_layer=3, n_embd=32, n_head=4, n_inner=64, n_positions=64, vocab_size=300,
                     initializer_range=0.2, bos_token_id=0, eos_token_id=0)
    return _save_and_load(GPT2LMHeadModel(cfg), folder)


@pytest.fixture(scope="session")
def tiny_mamba(tmp_path_factory):
    """(model, tokenizer): 3 layers, hidden 32, d_inner 64, d_state 8."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_mamba")
    cfg = MambaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64, state_size=8, vocab_size=300,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return _save_and_load(MambaForCausalLM(cfg), folder)


@pytest.fixture(scope="session")
def tiny_neox(tmp_path_factory):
    """(model, tokenizer): GPT-NeoX (Pythia's architecture), 3 layers, hidden 32, 64 neurons a layer, rotary on
    half of each head's dimensions, parallel residual."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_neox")
    cfg = GPTNeoXConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=64, rotary_pct=0.5, vocab_size=300, initializer_range=0.2,
                        bos_token_id=0, eos_token_id=0)
    return _save_and_load(GPTNeoXForCausalLM(cfg), folder)


def tiny_mamba2_config(**overrides) -> Mamba2Config:
    """3 layers, hidden 32, d_inner 64 = 8 heads x head_dim 8 in 2 groups, d_state 8, chunks of 4 positions (so
    that prompts span several chunks of transformers' SSD scan), conv bias."""
    cfg = dict(num_hidden_layers=3, hidden_size=32, expand=2, num_heads=8, head_dim=8, n_groups=2, state_size=8,
               chunk_size=4, use_conv_bias=True, vocab_size=300, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return Mamba2Config(**(cfg | overrides))


@pytest.fixture(scope="session")
def tiny_mamba2(tmp_path_factory):
    """(model, tokenizer): see `tiny_mamba2_config`; default time_step_limit (0, inf)."""
    torch.manual_seed(0)
    return _save_and_load(Mamba2ForCausalLM(tiny_mamba2_config()), tmp_path_factory.mktemp("tiny_mamba2"))


@pytest.fixture(scope="session")
def tiny_falcon_mamba(tmp_path_factory):
    """(model, tokenizer): 3 layers, hidden 32, d_inner 64, d_state 8, RMS-normalised B, C and Delta; a large init
    (initializer_range 0.5) so that P(answer) is visibly non-linear in the neurons (completeness test)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_falcon_mamba")
    cfg = FalconMambaConfig(num_hidden_layers=3, hidden_size=32, state_size=8, vocab_size=300, initializer_range=0.5,
                            bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return _save_and_load(FalconMambaForCausalLM(cfg), folder)


@pytest.fixture(scope="session", params=["gpt2", "mamba", "neox", "mamba2", "falcon_mamba"])
def tiny_model(request):
    """Every tiny model, one after the other."""
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory):
    """{"gpt2": folder, "mamba": folder}: the trained demo models, built once per session (about 30 s on a CPU).

    Built in a fresh temporary folder unless $KN_TEST_DEMO_CACHE names a cache to reuse across runs.
    """
    import os

    from facts import FACTS
    from models.demo import ensure_demo_models

    cache = os.environ.get("KN_TEST_DEMO_CACHE") or tmp_path_factory.mktemp("demo")
    return ensure_demo_models(FACTS, cache_dir=cache, progress=False)
