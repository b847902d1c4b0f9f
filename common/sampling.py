"""Seeded samples of the later stages that would otherwise grow with the square of the facts (editing, attention):
which items are used is a function of (seed, the stage's name, how many there are, how many are asked for) only."""

from __future__ import annotations

import zlib

import numpy as np


def seeded_rng(seed: int, name: str) -> np.random.Generator:
    """A generator that is a function of (seed, name) only: `name` gives each stage (or item) its own draws."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def sample_indices(n: int, k: int | None, seed: int, name: str) -> np.ndarray:
    """Sorted indices of a seeded sample of k of range(n) without replacement (all of them when k is None or at
    least n). `name` gives each stage its own draws."""
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(seeded_rng(seed, name).choice(n, k, replace=False))
