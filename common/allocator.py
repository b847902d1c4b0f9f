"""How the C library's allocator treats the large tensors of a run: kept for reuse, or returned at once.

glibc's malloc hands blocks above a threshold (128 KiB at first, raised as such blocks are freed) straight to
the operating system and back, and returns free memory at the top of its heap when more than twice that is
free. A staircase batch allocates and frees tensors of several MB per block, so many of them are faulted in
again page by page: the `knowledge` mode on GPT-2-small and Mamba-130M shapes took 11 million page faults and
about a minute of kernel time in a four-minute run. `retain_freed_memory` raises both thresholds, so blocks of up to
32 MiB (glibc's largest threshold) come from the heap and freed memory is kept for the next batch, up to 2 GiB
of it at the heap's top. The numbers do not change; a process's resident memory stays near its peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

from common.errors import UserError

log = logging.getLogger("knowledge_neurons")

ALLOCATORS = ("retain", "default")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed: blocks up to 32 MiB come from the heap
TRIM_THRESHOLD = 2**31 - 1  # keep up to 2 GiB free at the heap's top (mallopt takes a C int)

_setting = "default"


def retain_freed_memory() -> str:
    """Set glibc's mmap and trim thresholds (see the module docstring) for this process, once; returns the
    setting recorded in the outputs ("default" where the C library is not glibc: the numbers are the same)."""
    global _setting
    if _setting != "default":
        return _setting
    libc = _glibc()
    if libc is None:
        log.debug("allocator: not glibc (%s), left as it is", platform.libc_ver()[0] or platform.system())
        return _setting
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        raise UserError("glibc's mallopt refused the allocator thresholds; run with --allocator default")
    _setting = f"retain (glibc mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold 2 GiB)"
    return _setting


def setting() -> str:
    """What this process's allocator does, for the outputs' provenance."""
    return _setting


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
