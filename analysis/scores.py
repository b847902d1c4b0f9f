"""The score files of the knowledge stage: what `--save-scores` keeps, the file of each process, and reading them back.

One process writes `<label>_knowledge_neurons.npz`; under torchrun each rank writes the facts it attributed to
`<label>_knowledge_neurons.rank<r>-of-<n>.npz`, so that no process ever holds every score tensor. A file is a
plain npz (`np.load` opens it) written one fact at a time into a temporary file that is renamed when the stage
succeeds: an interrupted or failed run leaves no half-written file. Per fact `<id>`:

- `prompt`: `<id>/scores` (n_prompts, n_layers, width) float32, each prompt's integrated-gradients scores;
- `fact`: `<id>/mean_scores` (n_layers, width) float32, their mean over the fact's prompts (the refined
  neurons' scores are entries of it);
- both: `<id>/completeness_delta` (n_prompts, n_layers) float32 and `<id>/coarse_neurons` (n_coarse, 3) int32,
  the coarse neurons of every prompt as rows (prompt, layer, neuron index) at the run's threshold;
- `none`: no file.

`load_scores` reads the files a knowledge JSON names (`scores_files`) back into one read-only mapping.
"""

from __future__ import annotations

import contextlib
import json
import logging
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format
from torch import Tensor

from common.outputs import atomic_file
from knowledge_neurons import coarse_neurons

log = logging.getLogger(__name__)

SAVE_SCORES = ("none", "fact", "prompt")
PROMPT_SCORES_LIMIT = 2 * 1024**3  # bytes: up to this, every prompt's scores are kept by default, above it the means


def what_fits(n_prompts: int, n_layers: int, width: int) -> str:
    """The default of --save-scores: "prompt" when every prompt's float32 scores take at most
    PROMPT_SCORES_LIMIT bytes, else "fact"."""
    return "prompt" if n_prompts * n_layers * width * 4 <= PROMPT_SCORES_LIMIT else "fact"


def score_file_names(stem: str, world_size: int) -> list[str]:
    """The score files of a run in rank order: `<stem>.npz` for one process, `<stem>.rank<r>-of-<n>.npz` under
    torchrun."""
    if world_size == 1:
        return [f"{stem}.npz"]
    return [f"{stem}.rank{r}-of-{world_size}.npz" for r in range(world_size)]


def fact_arrays(fact_id: str, scores: Tensor, delta: Tensor, mode: str, threshold: float) -> dict[str, np.ndarray]:
    """The arrays one fact contributes to a score file (see the module docstring); scores
    (n_prompts, n_layers, width), delta (n_prompts, n_layers)."""
    coarse = [(k, lay, i) for k, s in enumerate(scores) for lay, i, _ in coarse_neurons(s, threshold)]
    arrays = {
        f"{fact_id}/completeness_delta": delta.float().numpy(),
        f"{fact_id}/coarse_neurons": np.array(coarse, dtype=np.int32).reshape(-1, 3),
    }
    if mode == "prompt":
        arrays[f"{fact_id}/scores"] = scores.float().numpy()
    else:
        arrays[f"{fact_id}/mean_scores"] = scores.float().mean(0).numpy()
    return arrays


class ScoreWriter:
    """A score file being written, one fact at a time (`score_file` opens it).

    mode: "fact" or "prompt" (see the module docstring); threshold: the coarse neurons' (Options.threshold).
    """

    def __init__(self, archive: zipfile.ZipFile, mode: str, threshold: float):
        self._zip, self.mode, self.threshold = archive, mode, threshold

    def add(self, fact_id: str, scores: Tensor, delta: Tensor) -> None:
        """One fact's arrays: scores (n_prompts, n_layers, width), delta (n_prompts, n_layers)."""
        for key, array in fact_arrays(fact_id, scores, delta, self.mode, self.threshold).items():
            with self._zip.open(f"{key}.npy", "w", force_zip64=True) as f:  # as np.savez writes each array
                npy_format.write_array(f, array, allow_pickle=False)


@contextlib.contextmanager
def score_file(path: Path, mode: str, threshold: float) -> Iterator[ScoreWriter]:
    """A ScoreWriter for `path`: the file is renamed into place when the body succeeds and removed when it
    raises (`common.outputs.atomic_file`), so that nobody sees a half-written score file."""
    if mode not in ("fact", "prompt"):
        raise ValueError(f"a score file holds 'fact' or 'prompt' scores, not {mode!r}")
    with atomic_file(path) as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as z:
        yield ScoreWriter(z, mode, threshold)
    log.info("wrote %s", path)


def remove_stale(folder: Path, stem: str, keep: Sequence[str]) -> None:
    """Score files of `stem` from an earlier run (another number of ranks, another --save-scores) that the
    current JSON does not name, so that none of them is taken for this run's."""
    for path in [Path(folder) / f"{stem}.npz", *Path(folder).glob(f"{stem}.rank*-of-*.npz")]:
        if path.name not in keep and path.exists():
            path.unlink()
            log.info("removed %s of an earlier run", path)


class Scores(Mapping):
    """The arrays of one or several score files as one read-only mapping (key -> np.ndarray, read on access);
    a context that closes the files.

    >>> with load_scores("out/gpt2_knowledge_neurons.json") as scores:
    ...     scores["capital_france/scores"]          # (n_prompts, n_layers, width), whichever rank wrote it
    """

    def __init__(self, paths: Sequence[Path]):
        self._files = [np.load(p) for p in paths]
        self._where = {key: f for f in self._files for key in f.files}

    def __getitem__(self, key: str) -> np.ndarray:
        return self._where[key][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self) -> Scores:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_scores(knowledge_json: str | Path) -> Scores:
    """Every score file a `<label>_knowledge_neurons.json` names (`scores_files`, beside it): the one file of a
    single process or every rank's shard, as one mapping; empty when the run saved none."""
    path = Path(knowledge_json)
    names = json.loads(path.read_text())["scores_files"]
    return Scores([path.parent / name for name in names])


def save_scores_mode(requested: str | None, n_prompts: int, n_layers: int, width: int, label: str) -> str:
    """--save-scores as given, or when not given `what_fits` these prompts and this model (logged)."""
    if requested is not None:
        return requested
    mode = what_fits(n_prompts, n_layers, width)
    log.info("%s: --save-scores %s (every prompt's float32 scores take %.2f GiB; up to %g GiB they are all kept)",
             label, mode, n_prompts * n_layers * width * 4 / 2**30, PROMPT_SCORES_LIMIT / 2**30)
    return mode
