"""Writing results: atomic files (JSON, text, any writer), provenance (versions, options), console tables."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from common import allocator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A file object to write `path` through: a temporary file in the same folder, renamed to `path` when the body
    succeeds and removed when it raises, so that a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: Path, write) -> Path:
    """`write(f)` into `path` through `atomic_file`."""
    with atomic_file(path) as f:
        write(f)
    return Path(path)


def _clean(value: Any) -> Any:
    """JSON-ready: numpy scalars to Python, tuples to lists, NaN/inf to None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _dumps(value: Any, depth: int = 0) -> str:
    """JSON indented by 2 spaces a level, except that a list of plain values (numbers, strings, null: a neuron
    [layer, index, score], a prompt's tokens) stays on one line."""
    nested = isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict | list) for v in value))
    if not nested or not value:
        return json.dumps(value, allow_nan=False)
    pad, end = "  " * (depth + 1), "  " * depth
    if isinstance(value, dict):
        items = [f"{pad}{json.dumps(k)}: {_dumps(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{end}}}"
    return "[\n" + ",\n".join(pad + _dumps(v, depth + 1) for v in value) + f"\n{end}]"


def write_json(path: Path, data: dict) -> Path:
    """`data` as JSON (`_clean`ed; see `_dumps` for the layout), atomically."""
    text = _dumps(_clean(data)) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode()))


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def versions() -> dict[str, str | None]:
    """Library versions, the git commit of this code and the allocator setting (`allocator`), for the output's
    provenance."""
    import tokenizers
    import torch
    import transformers

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip() or None
    except OSError:
        commit = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
        "code_commit": commit,
        "allocator": allocator.setting(),
    }


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table; floats with 3 significant digits, None as '-'."""

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    def justify(v: Any, text: str, width: int) -> str:
        return text.ljust(width) if isinstance(v, str) else text.rjust(width)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), "  ".join("-" * w for w in widths)]
    for row, texts in zip(rows, cells, strict=True):
        out.append("  ".join(justify(v, c, w) for v, c, w in zip(row, texts, widths, strict=True)))
    return "\n".join(line.rstrip() for line in out)
