"""Per-fact files that let a stage resume: one file per finished fact of one model and one set of options, and the
model fingerprint that names them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

from common.outputs import atomic_write
from facts import Fact

log = logging.getLogger(__name__)


def model_fingerprint(model) -> str:
    """Identifies a model's configuration and weights cheaply (config + a slice of the embedding)."""
    h = hashlib.sha256(model.config.to_json_string().encode())
    h.update(model.get_input_embeddings().weight.detach().flatten()[:4096].cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


class FactFiles:
    """One file per finished fact of one model under `folder`/<model>[-<kind>]-<key>, what lets a stage resume.

    key: everything besides the model and the fact that the stage's numbers depend on (its options); its hash
    names the folder. A fact's file is named by its id and a hash of its content (without `new_answer`, which
    only editing reads) and of `extra`, what else that fact's numbers depend on.
    """

    suffix = ".pt"

    def __init__(self, folder: Path, model_name: str, model, key: dict, kind: str = ""):
        content = json.dumps({"model": model_fingerprint(model), **key}, sort_keys=True)
        self.key = hashlib.sha256(content.encode()).hexdigest()[:16]
        self.folder = Path(folder) / "-".join(filter(None, [Path(model_name).name or "model", kind, self.key]))

    def _path(self, fact: Fact, extra: dict | None = None) -> Path:
        scored = {k: v for k, v in dataclasses.asdict(fact).items() if k != "new_answer"}  # edits only
        if extra is not None:
            scored["extra"] = extra
        content = json.dumps(scored, sort_keys=True).encode()
        return self.folder / f"{fact.id}-{hashlib.sha256(content).hexdigest()[:12]}{self.suffix}"

    def _read(self, fact: Fact, parse, extra: dict | None = None):
        """parse(the bytes of fact's file), or None when there is no file or it is damaged: parse raised (a warning
        names the file; the fact is then recomputed and the file rewritten)."""
        path = self._path(fact, extra)
        if not path.exists():
            return None
        try:
            return parse(path.read_bytes())
        except Exception as exc:  # whatever makes the file unreadable, it is recomputed, never used
            reason = f"{type(exc).__name__}: {str(exc).split('. ')[0]}"  # torch's messages run on for sentences
            log.warning("damaged cache file %s (%s); recomputing fact %s", path, reason, fact.id)
            return None

    def _write(self, fact: Fact, data: bytes, extra: dict | None = None) -> None:
        atomic_write(self._path(fact, extra), lambda f: f.write(data))
