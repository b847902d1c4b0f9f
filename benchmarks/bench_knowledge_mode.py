"""Time the whole `python main.py knowledge` run on the built-in facts with real-shaped GPT-2 and Mamba.

The models have the shapes of GPT-2-small and Mamba-130M with random weights (as in bench_attribution.py; timing
does not depend on the weights) and a word-level stand-in tokenizer over the facts' words: one token per word
or punctuation mark, about what GPT-2's tokenizer gives for these common words (it splits some rare names into
several). The run is `main.py knowledge --gpt2-model ... --mamba-model ... --fresh` in a subprocess with
--threads torch threads; the table gives the whole run's wall time and when each model's knowledge neurons were
written (interventions come after both). With --procs N the run is sharded over N processes of --threads
threads each by torchrun (gloo), as `torchrun --standalone --nproc-per-node N main.py knowledge` does: N
one-thread processes may use the cores better than one N-thread process, whose small operations split badly
(the README has the figures). --code runs the main.py of another checkout on the same models, e.g. a
`git worktree` of an older commit, to compare code versions on the same machine:

    python benchmarks/bench_knowledge_mode.py [--threads 2] [--procs 1] [--steps 20] [--code DIR]
                                              [-- extra main.py options]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_attribution import save_model  # noqa: E402

from common.outputs import table  # noqa: E402
from facts import FACTS  # noqa: E402

ARCHS = ("gpt2", "mamba")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads of the run (default: 2)")
    p.add_argument("--procs", type=int, default=1, help="processes (torchrun ranks) of --threads threads (default: 1)")
    p.add_argument("--steps", type=int, default=20, help="integration steps (default: 20)")
    p.add_argument("--code", type=Path, default=ROOT, help="the checkout whose main.py runs (default: this one)")
    p.add_argument("extra", nargs="*", help="more main.py options, after --")
    args = p.parse_args()
    texts = [text for fact in FACTS for text in (*fact.prompts, fact.answer)]
    with tempfile.TemporaryDirectory() as tmp:
        folders = {arch: Path(tmp) / arch for arch in ARCHS}
        for arch, folder in folders.items():
            save_model(arch, folder, texts)
        launcher = [sys.executable] if args.procs == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.procs)]
        cmd = [*launcher, str(args.code / "main.py"), "knowledge", "--gpt2-model", str(folders["gpt2"]),
               "--mamba-model", str(folders["mamba"]), "--out", str(Path(tmp) / "out"), "--steps", str(args.steps),
               "--fresh", *args.extra]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        start = time.perf_counter()
        marks = []
        with subprocess.Popen(cmd, cwd=args.code, env=env, stderr=subprocess.PIPE, text=True) as run:
            for line in run.stderr:  # log lines (passed on), stamped as they arrive
                sys.stderr.write(line)
                if line.split("]:")[-1].startswith("wrote "):  # torchrun may prefix "[rank0]:"
                    marks.append([Path(line.split("]:")[-1].split()[1]).name, time.perf_counter() - start])
        total = time.perf_counter() - start
        if run.returncode:
            raise SystemExit(f"main.py knowledge failed with exit code {run.returncode}")
    commit = subprocess.run(["git", "-C", str(args.code), "log", "-1", "--format=%h %s"], capture_output=True,
                            text=True).stdout.strip()
    print(f"\ncode: {args.code} ({commit[:80]})")
    print(f"{len(FACTS)} facts, {sum(len(f.prompts) for f in FACTS)} prompts, {args.steps} steps, "
          f"{args.procs} process(es) of {args.threads} thread(s), torch {torch.__version__}")
    print(table(["written", "after s"], [*marks, ["(whole run)", total]]))


if __name__ == "__main__":
    main()
