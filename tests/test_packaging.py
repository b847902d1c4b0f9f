"""`pip install .` is refused with a message that says how to run the project, instead of an empty wheel."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pip_install_says_this_is_not_a_package(tmp_path):
    # --no-build-isolation / --no-deps / --no-index: nothing is fetched; --target keeps the environment untouched
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", str(ROOT), "--no-build-isolation", "--no-deps", "--no-index",
         "--target", str(tmp_path / "site"), "--disable-pip-version-check"],
        capture_output=True, text=True, timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "is not an installable package" in output and "make run" in output and "README.md" in output
    assert not (tmp_path / "site").exists() or not any((tmp_path / "site").iterdir())  # nothing installed
