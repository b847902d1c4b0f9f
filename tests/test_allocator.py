"""The allocator setting: freed tensors' memory is reused instead of faulted in again (glibc only)."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting applies to glibc's malloc")

# A staircase's pattern: tensors of 1-30 MB held until the batch ends, then all freed, batch after batch.
# Prints the page faults of five batches after two per page they allocate.
BATCHES = """
import resource, sys, torch
from common.allocator import retain_freed_memory, setting
if sys.argv[1] == "retain":
    retain_freed_memory()
def batch():
    return [torch.ones(n << 18) for n in (4, 30, 8, 16, 2, 24, 12) * 3]  # n MiB of float32 each
batch(), batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    pages = sum(t.numel() * 4 for t in batch()) // 4096
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(setting(), (after - before) / (5 * pages), sep="|")
"""


def _faults_per_page(mode: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", BATCHES, mode], cwd=ROOT, capture_output=True, text=True, check=True)
    name, share = out.stdout.strip().split("|")
    return name, float(share)


@glibc
def test_retained_memory_is_not_faulted_in_again():
    name, share = _faults_per_page("retain")
    assert name.startswith("retain (glibc") and share < 0.01  # measured: 0
    name, share = _faults_per_page("default")  # the C library's own thresholds: many pages fault again
    assert name == "default" and share > 0.1  # measured: 0.2-0.4


def test_a_refused_setting_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    from common import allocator
    from main import main

    class Refusing:
        @staticmethod
        def mallopt(param: int, value: int) -> int:
            return 0  # what mallopt returns for a value it does not take

    monkeypatch.setattr(allocator, "_setting", "default")
    monkeypatch.setattr(allocator, "_glibc", lambda: Refusing())
    assert main(["knowledge", "--out", str(tmp_path), "-q"]) == 1
    err = capsys.readouterr().err
    assert "--allocator default" in err and "Traceback" not in err
    assert main(["knowledge", "--out", str(tmp_path), "-q", "--allocator", "default", "--steps", "0"]) == 1
    assert "--allocator" not in capsys.readouterr().err  # not asked for: never set, never refused
