"""Editing knowledge through knowledge neurons (Dai et al. 2022, section 6), against random-neuron controls.

A neuron's *value slot* is the vector its activation scales into the residual stream: its row of the block's
output projection (`Adapter.value_slots`). e(y) is the output-embedding row of token y (`Adapter.output_embedding`).

- Update a fact (Dai et al.): for each refined knowledge neuron, v <- v - lambda1 e(old) + lambda2 e(new) with
  lambda_k = norm_lambda_k * ||v|| / ||e|| (||v|| of the unedited slot; defaults 1 and 8 as in their paper).
  The "eleuther" rule (EleutherAI's knowledge-neurons package, EasyEdit) is v <- v - 2 e(old) + 2 e(new).
  old and new are the first tokens of the fact's answer and of the new answer.
- Erase a relation (Dai et al.): zero the value slots of the N refined neurons that occur most often across
  the relation's facts.

Edits never leak: `restored` snapshots the touched slots and writes them back bit for bit, also on errors.
`editing_eval.run_editing` measures the edits against random-slot controls.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from common.errors import UserError
from common.tokens import encode
from facts import Fact
from knowledge_neurons import Neuron
from models import Adapter

RULES = ("dai", "eleuther")
Slot = tuple[int, int]  # (layer, neuron index)


@dataclass(frozen=True)
class EditOptions:
    """Every option that shapes an editing result; stored in the output file."""

    rule: str = "dai"
    norm_lambda1: float = 1.0  # Dai et al.: weight of e(old), relative to ||v|| / ||e(old)||
    norm_lambda2: float = 8.0  # Dai et al.: weight of e(new), relative to ||v|| / ||e(new)||
    erase_top: int = 20  # neurons erased per relation
    random_draws: int = 5  # random-slot control sets per edit
    seed: int = 0
    edit_facts: int | None = 50  # facts updated: a seeded sample of this many (all when fewer; None: all)
    locality_prompts: int | None = 200  # other facts' prompts each edit is measured on (seeded sample; None: all)

    def __post_init__(self):
        if self.rule not in RULES:
            raise UserError(f"--edit-rule {self.rule}: choose from {', '.join(RULES)}")
        if self.erase_top < 1 or self.random_draws < 1:
            raise UserError("--erase-top and --random-draws must be positive")
        if any(n is not None and n < 1 for n in (self.edit_facts, self.locality_prompts)):
            raise UserError("--edit-facts and --locality-prompts must be positive (0 is not a sample; "
                            "pass a large number for all)")


# ----------------------------------------------------------------------------------------------------------
# writing into value slots


@contextmanager
def restored(adapter: Adapter, slots: Iterable[Slot]) -> Iterator[None]:
    """Snapshot the value slots `slots` and write them back bit for bit on exit, also when the body raises."""
    saved = {s: adapter.value_slots(s[0])[s[1]].detach().clone() for s in dict.fromkeys(slots)}
    try:
        yield
    finally:
        with torch.no_grad():
            for (layer, i), v in saved.items():
                adapter.value_slots(layer)[i].copy_(v)


def update(adapter: Adapter, slots: Iterable[Slot], old: int, new: int, options: EditOptions) -> None:
    """Write token `new` in place of token `old` into each slot (rule `options.rule`, see the module doc)."""
    e_old, e_new = adapter.output_embedding(old), adapter.output_embedding(new)  # (d_model,) each
    with torch.no_grad():
        for layer, i in dict.fromkeys(slots):
            v = adapter.value_slots(layer)[i]  # (d_model,) a view: in-place ops edit the model
            if options.rule == "dai":
                norm = v.norm()
                lambda1 = options.norm_lambda1 * norm / e_old.norm()
                lambda2 = options.norm_lambda2 * norm / e_new.norm()
            else:
                lambda1 = lambda2 = 2.0
            v -= lambda1 * e_old
            v += lambda2 * e_new


def erase(adapter: Adapter, slots: Iterable[Slot]) -> None:
    """Zero the value slots: the neurons no longer write anything."""
    with torch.no_grad():
        for layer, i in dict.fromkeys(slots):
            adapter.value_slots(layer)[i].zero_()


def relation_neurons(refined: dict[str, Sequence[Neuron]], fact_ids: Sequence[str], top: int) -> list[Slot]:
    """The `top` refined neurons that occur in most of the facts `fact_ids` (ties: lower layer, then index)."""
    counts = Counter((lay, i) for fid in fact_ids for lay, i, _ in refined[fid])
    return sorted(counts, key=lambda s: (-counts[s], s))[:top]


# ----------------------------------------------------------------------------------------------------------
# new answers


def first_token(tokenizer, fact: Fact, answer: str) -> int:
    """The first token of `answer` as it follows the fact's prompts (all end where the answer begins)."""
    return encode(tokenizer, fact.prompts[0], answer, f"fact {fact.id}")[1][0]


def new_answers(facts: Sequence[Fact], tokenizer) -> dict[str, tuple[str, str] | None]:
    """Fact id -> (new answer, where it comes from), or None when the relation offers none.

    A fact's `new_answer` from the facts file wins; otherwise the answer of the next fact of the same relation
    (table order, wrapping around) whose answer starts with another token.
    """
    out: dict[str, tuple[str, str] | None] = {}
    for k, fact in enumerate(facts):
        old = first_token(tokenizer, fact, fact.answer)
        if fact.new_answer is not None:
            if first_token(tokenizer, fact, fact.new_answer) == old:
                raise UserError(f"fact {fact.id}: new_answer {fact.new_answer!r} starts with the same token as "
                                f"the answer {fact.answer!r}, so an edit of the first token cannot tell them apart")
            out[fact.id] = (fact.new_answer, "facts file")
            continue
        ring = facts[k + 1:] + facts[:k]
        other = next((f for f in ring if f.relation == fact.relation
                      and first_token(tokenizer, fact, f.answer) != old), None)
        out[fact.id] = (other.answer, f"answer of {other.id}") if other else None
    return out
