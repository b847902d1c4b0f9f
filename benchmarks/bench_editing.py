"""Seconds of the editing evaluation and the interventions on the demo models: `Adapter.logits` (state-space
models: their own scan) against the model's own forward (transformers' CPU path), in the same run.

Both paths run `editing.evaluation.run_editing` and `analysis.interventions.run_interventions` on the same facts
(the first --facts built-in facts, two per relation, in table order), the same knowledge neurons (one attribution
with --steps steps) and the same options (--random-draws), alternating --repeats times; the fastest run of each is
kept. The two paths' documents must agree (every number to 1e-4 relative, the same top-1 flags), else it stops.

    python benchmarks/bench_editing.py [--facts 6] [--random-draws 5] [--steps 10] [--threads 1] [--repeats 1]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from analysis.interventions import run_interventions  # noqa: E402
from analysis.stage import Options, find_knowledge_neurons  # noqa: E402
from common.allocator import retain_freed_memory  # noqa: E402
from common.outputs import table  # noqa: E402
from editing.edits import EditOptions  # noqa: E402
from editing.evaluation import run_editing  # noqa: E402
from facts import FACTS, relations  # noqa: E402
from knowledge_neurons import KnowledgeNeurons  # noqa: E402
from models import Adapter, load_model  # noqa: E402
from models.demo import ensure_demo_models  # noqa: E402


def _same(a, b, where="") -> None:
    """Every number of two JSON-like documents equal to 1e-4 relative (1e-6 absolute), everything else equal."""
    if isinstance(a, dict):
        if a.keys() != b.keys():
            raise SystemExit(f"{where}: keys differ")
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        if len(a) != len(b):
            raise SystemExit(f"{where}: lengths differ")
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{k}]")
    elif isinstance(a, float) and isinstance(b, float):
        if not math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6):
            raise SystemExit(f"{where}: {a} != {b}")
    elif a != b:
        raise SystemExit(f"{where}: {a!r} != {b!r}")


def _run(stage: str, kn: KnowledgeNeurons, result, facts, draws: int) -> dict:
    if stage == "editing":
        return run_editing(kn, result, EditOptions(random_draws=draws), progress=False)
    return run_interventions(kn, facts, result.refined, draws=draws, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=6)
    parser.add_argument("--random-draws", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    retain_freed_memory()  # as main.py does
    torch.set_num_threads(args.threads)
    facts = [f for group in relations(FACTS).values() for f in group[:2]][: args.facts]
    folders = ensure_demo_models(FACTS, progress=False)
    rows = []
    for arch, folder in folders.items():
        model, tokenizer = load_model(str(folder))
        kn = KnowledgeNeurons(model, tokenizer)
        result = find_knowledge_neurons(kn, facts, Options(steps=args.steps), arch, progress=False)
        fast_logits = kn.adapter.logits
        timings: dict[tuple[str, str], float] = {}
        docs: dict[tuple[str, str], dict] = {}
        for _ in range(args.repeats):
            for path in ("model forward", "Adapter.logits"):
                kn.adapter.logits = fast_logits if path == "Adapter.logits" else Adapter.logits.__get__(kn.adapter)
                for stage in ("editing", "interventions"):
                    start = time.perf_counter()
                    docs[stage, path] = _run(stage, kn, result, facts, args.random_draws)
                    timings[stage, path] = min(timings.get((stage, path), math.inf), time.perf_counter() - start)
        kn.adapter.logits = fast_logits
        for stage in ("editing", "interventions"):
            _same(docs[stage, "model forward"], docs[stage, "Adapter.logits"], f"{arch} {stage}")
            old, new = timings[stage, "model forward"], timings[stage, "Adapter.logits"]
            rows.append([arch, stage, f"{old:.1f}", f"{new:.1f}", f"{old / len(facts):.2f}", f"{new / len(facts):.2f}",
                         f"{old / new:.2f}x"])
    print(f"{len(facts)} facts, {args.random_draws} random draws, {args.threads} thread(s), best of {args.repeats}; "
          "the two paths' documents agree")
    print(table(["model", "stage", "model forward s", "Adapter.logits s", "s/fact before", "s/fact after", "speed-up"],
                rows))


if __name__ == "__main__":
    main()
