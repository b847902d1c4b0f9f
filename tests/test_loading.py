"""The loader: transformers' advice to install Mamba's CUDA kernels is silenced where it cannot help."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

from models.loading import quiet_kernel_advice


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _advice_after_a_forward(model) -> list[str]:
    """Messages naming Mamba's kernel packages that transformers logs during one forward pass."""
    logging.Logger.warning_once.cache_clear()  # transformers logs each advice once per process
    records = _Records()
    root = logging.getLogger("transformers")  # every transformers logger reports to this one
    root.addHandler(records)
    try:
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))
    finally:
        root.removeHandler(records)
    return [m for m in records.messages if "mamba_ssm" in m or "causal_conv1d" in m or "causal-conv1d" in m]


@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is not None, reason="the kernels are installed: no advice")
def test_kernel_advice_is_silenced_on_cpu_only(tiny_mamba):
    model = tiny_mamba[0]
    try:
        quiet_kernel_advice(torch.device("cuda"))  # as on a GPU: the advice is shown (so this test can fail)
        assert _advice_after_a_forward(model)
        quiet_kernel_advice(torch.device("cpu"))
        assert _advice_after_a_forward(model) == []
    finally:
        quiet_kernel_advice(model.device)
