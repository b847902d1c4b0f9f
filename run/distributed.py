"""Running `main.py` under torchrun: the knowledge-neuron stage sharded over processes, GPUs and hosts.

    torchrun --standalone --nproc-per-node N main.py knowledge ...            # N ranks on one machine
    torchrun --nnodes H --node-rank R --nproc-per-node N --master-addr HOST0 \\
             --master-port 29500 main.py knowledge ...                        # on each host R of H

torchrun starts WORLD_SIZE processes ("ranks") and tells each its RANK and LOCAL_RANK. Every rank loads the
models and facts itself and computes the same plan: the facts split into shares of equal work. A rank
attributes its share with `analysis.find_knowledge_neurons`, which caches each finished fact under its own
<out>/.kn_cache, and sends the results to rank 0 over the process group (gloo on CPU; on CUDA, each rank on
cuda:LOCAL_RANK, nccl for CUDA tensors and gloo for the results, which are Python objects in host memory),
so no shared filesystem is needed. Rank 0 puts the facts back in their order, writes
every file and runs the later stages alone; the other ranks stop after the knowledge stage.

Progress travels through counters in the process group's key-value store; a failure travels through the
same gather as the results, so every rank stops and rank 0 writes nothing. Without torchrun (WORLD_SIZE
unset or 1) `shard_and_gather` just calls the attribution and the other functions do nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import itertools
import logging
import math
import os
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from analysis.cache import model_fingerprint
from analysis.stage import ModelResult
from common.errors import UserError
from common.tokens import continuation
from facts import Fact, facts_hash
from knowledge_neurons import KnowledgeNeurons
from models import resolve_device

log = logging.getLogger(__name__)

CHUNKS_PER_RANK = 20  # a share is attributed in about this many calls; progress and early stops come between them
POLL_SECONDS = 0.2
WAIT_LIMIT = timedelta(hours=12)  # the longest a rank waits in a collective, e.g. while rank 0 writes large files
_stages = itertools.count()  # the n-th sharded stage of this run (the same on every rank): names its store keys
_failed_together = False  # every rank stopped on the same error, which rank 0 reports


class RankFailed(UserError):
    """A sharded stage failed on some rank; every rank raises it, rank 0 prints it."""


class SameOnEveryRank(UserError):
    """A mistake in the input (options, facts, models), found before any work: every rank finds it alike, so
    rank 0 alone prints it."""


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def enabled() -> bool:
    """Started by torchrun with more than one rank."""
    return world_size() > 1


def is_main() -> bool:
    """Rank 0, or a run without torchrun: the process that writes files and runs the later stages."""
    return rank() == 0


def init(device: str) -> None:
    """Join the process group that torchrun set up (nothing without torchrun)."""
    if not enabled() or dist.is_initialized():
        return
    target = resolve_device(device)
    if target.type == "cuda":
        if target.index is not None:
            raise UserError(f"--device {device}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda")
        torch.cuda.set_device(local_rank())  # "cuda" now means this rank's GPU, for the models too
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun sets it to 1 with several ranks a host; else share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    _bind_no_group_by_default()
    # CUDA tensors would go over nccl; the results are Python objects in host memory and travel over gloo
    backend = "cpu:gloo,cuda:nccl" if target.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=WAIT_LIMIT)
    log.info("torchrun: %d ranks, %s, %d torch threads each", world_size(), backend, torch.get_num_threads())


def _bind_no_group_by_default() -> None:
    """Import the torch modules that take `group.WORLD` as a default argument before the group exists.

    Imported later (transformers imports them while it loads a model) they hold the process group in their
    functions' defaults, out of `destroy_process_group`'s reach, and gloo's threads run on into the interpreter's
    shutdown: the state in which pytorch/pytorch#179291 sees processes abort ("terminate called without an
    active exception"), as one of our ranks did once in CI, after which torchrun killed the others mid-write.
    """
    # fsdp.sharded_grad_scaler, nn.functional and optim.zero_redundancy_optimizer, as of torch 2.13
    import torch.distributed.fsdp
    import torch.distributed.nn
    import torch.distributed.optim  # noqa: F401


@contextlib.contextmanager
def local_rank_zero_first() -> Iterator[None]:
    """Runs the body on each host's first rank, then on its other ranks (e.g. building the demo models once)."""
    if not enabled():
        yield
        return
    if local_rank() != 0:
        dist.barrier()
    yield
    if local_rank() == 0:
        dist.barrier()


def close() -> None:
    """Leave the process group; after a shared failure, first wait until rank 0 has reported it."""
    if not dist.is_initialized():
        return
    if _failed_together:
        dist.barrier()
    dist.destroy_process_group()


def error_line(exc: UserError) -> str | None:
    """What this process prints for `exc`: None on ranks other than 0 when every rank stopped on it."""
    if not enabled():
        return str(exc)
    if isinstance(exc, (RankFailed, SameOnEveryRank)):
        return str(exc) if is_main() else None
    return f"rank {rank()}: {exc}"


def _fail_together(message: str) -> None:
    global _failed_together
    _failed_together = True
    raise RankFailed(message)


# -----------------------------------------------------------------------------
# the plan

def fact_work(tokenizer, facts: Sequence[Fact]) -> list[int]:
    """Each fact's cost in staircases (one clean pass + one batch of (layer, step) rows): one per
    (prompt, answer token)."""
    lengths: dict[str, int] = {}
    work = []
    for fact in facts:
        total = 0
        for prompt in fact.prompts:
            text = continuation(prompt, fact.answer)
            if text not in lengths:
                lengths[text] = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            total += lengths[text]
        work.append(total)
    return work


def shard(work: Sequence[float], n: int) -> list[list[int]]:
    """Item indices for each of n ranks, balanced by work: the largest item first onto the least-loaded rank
    (ties: lower index first, lower rank first). Each share is in index order; the result depends only on
    the arguments, so every rank computes the same plan."""
    loads = [(0.0, r) for r in range(n)]  # a heap of (work so far, rank)
    shares: list[list[int]] = [[] for _ in range(n)]
    for i in sorted(range(len(work)), key=lambda i: (-work[i], i)):
        load, r = heapq.heappop(loads)
        shares[r].append(i)
        heapq.heappush(loads, (load + work[i], r))
    return [sorted(s) for s in shares]


# -----------------------------------------------------------------------------
# the sharded stage

def shard_and_gather(
    attribute: Callable[..., ModelResult], kn: KnowledgeNeurons, facts: Sequence[Fact], progress: bool = True,
    label: str | None = None,
) -> ModelResult | None:
    """`attribute(facts, progress=...)` over all facts (e.g. a partial of `analysis.find_knowledge_neurons`).
    `label` ("GPT-2") names the model in the progress bar and log (default: its architecture).

    In one process it is just called. Under torchrun each rank calls it on its share, chunk by chunk, and
    rank 0 returns the whole ModelResult with the facts in their order; the other ranks return None. If a
    rank fails, every rank raises RankFailed naming it and the cause, so rank 0 writes nothing. Rank 0 logs
    the stage's throughput in prompts per second.
    """
    start = time.perf_counter()
    if enabled():
        result = _sharded(attribute, kn, facts, progress, label or kn.model.config.model_type)
    else:
        result = attribute(list(facts), progress=progress)
    if result is not None:
        seconds = time.perf_counter() - start
        n_prompts = sum(len(f.prompts) for f in facts)
        log.info("knowledge neurons %s: %d prompts of %d facts in %.1f s on %d rank(s): %.3f prompts/s",
                 label or result.architecture, n_prompts, len(facts), seconds, world_size(), n_prompts / seconds)
    return result


def _sharded(attribute, kn: KnowledgeNeurons, facts: Sequence[Fact], progress: bool,
             label: str) -> ModelResult | None:
    _same_everywhere(kn, facts)
    stage = next(_stages)
    store = dist.distributed_c10d._get_default_store()
    keys = {k: f"knowledge_neurons/{stage}/{k}" for k in ("facts_done", "ranks_done", "failed")}
    mine = shard(fact_work(kn.tokenizer, facts), world_size())[rank()]
    bar = tqdm(total=len(facts), unit="fact", disable=not (progress and is_main()),
               desc=f"knowledge neurons {label} ({world_size()} ranks)")
    outcome = _attribute_share(attribute, facts, mine, store, keys, bar)
    store.add(keys["ranks_done"], 1)
    while store.add(keys["ranks_done"], 0) < world_size():  # wait here, not in the gather, which has a timeout
        _show(bar, store, keys)
        time.sleep(POLL_SECONDS)
    _show(bar, store, keys)
    bar.close()
    gathered = [None] * world_size() if is_main() else None
    dist.gather_object(outcome, gathered, dst=0)
    failure = [_failure(gathered) if is_main() else None]
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        _fail_together(failure[0])
    return _merge(gathered, len(facts)) if is_main() else None


def _same_everywhere(kn: KnowledgeNeurons, facts: Sequence[Fact]) -> None:
    """Every rank must hold the same model and facts (each host reads its own copy)."""
    mine = (model_fingerprint(kn.model), facts_hash(facts))
    every: list = [None] * world_size()
    dist.all_gather_object(every, mine)
    differ = [r for r, seen in enumerate(every) if seen != every[0]]
    if differ:
        _fail_together(f"rank(s) {', '.join(map(str, differ))} loaded another model or fact list than rank 0 "
                       "(every host needs the same model files and facts)")


def _show(bar: tqdm, store, keys: dict[str, str]) -> None:
    """Rank 0's bar: the facts finished on every rank."""
    if not bar.disable:
        bar.update(store.add(keys["facts_done"], 0) - bar.n)


def _attribute_share(attribute, facts, mine, store, keys, bar) -> tuple[bool, object]:
    """(True, (indices, ModelResult of them or None)), or (False, what went wrong here / None when another
    rank failed first and this one stopped)."""
    size = max(1, math.ceil(len(mine) / CHUNKS_PER_RANK))
    parts = []
    for begin in range(0, len(mine), size):
        chunk = [facts[i] for i in mine[begin : begin + size]]
        if store.add(keys["failed"], 0):
            return False, None
        try:
            parts.append(attribute(chunk, progress=False))
        except Exception as exc:  # reported to every rank through the gather; nothing is written
            store.add(keys["failed"], 1)
            names = ", ".join(f.id for f in chunk[:3]) + (f" (+{len(chunk) - 3} more)" if len(chunk) > 3 else "")
            if isinstance(exc, UserError):
                return False, f"rank {rank()} failed on {names}: {exc}"
            log.error("rank %d failed on %s:\n%s", rank(), names, traceback.format_exc())
            return False, f"rank {rank()} failed on {names}: {type(exc).__name__}: {exc} (traceback in its log)"
        store.add(keys["facts_done"], len(chunk))
        _show(bar, store, keys)
    merged = dataclasses.replace(parts[0], facts=[r for p in parts for r in p.facts]) if parts else None
    return True, (mine, merged)


def _failure(gathered: list) -> str | None:
    """Rank 0: None if every rank succeeded, else the errors of the ranks that failed."""
    if all(ok for ok, _ in gathered):
        return None
    errors = [text for ok, text in gathered if not ok and text]
    return "; ".join(errors) + "; this stage wrote no results"


def _merge(gathered: list, n_facts: int) -> ModelResult:
    """Rank 0: the ranks' results as one ModelResult, facts in their original order."""
    ordered: list = [None] * n_facts
    results = [(indices, result) for _, (indices, result) in gathered if result is not None]
    for indices, result in results:
        for i, fact_result in zip(indices, result.facts, strict=True):
            ordered[i] = fact_result
    return dataclasses.replace(results[0][1], facts=ordered)
