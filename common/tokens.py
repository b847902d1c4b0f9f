"""Turning a (prompt, answer) pair into token ids, the same way everywhere.

The answer is the continuation of the prompt: a leading space is inserted when neither the prompt ends
with nor the answer starts with whitespace ("The capital of France is" + "Paris" -> " Paris"). Prompt and
answer are tokenized separately so that the prompt's tokens end exactly where the answer begins.
"""

from __future__ import annotations

from common.errors import UserError


def continuation(prompt: str, answer: str) -> str:
    """The answer text as it follows the prompt."""
    if prompt and answer and not prompt[-1].isspace() and not answer[0].isspace():
        return " " + answer
    return answer


def encode_prompt(tokenizer, prompt: str, name: str = "") -> list[int]:
    """The prompt's ids; an empty prompt, or one without tokens, is an error naming `name`."""
    where = f"{name}: " if name else ""
    if not prompt.strip():
        raise UserError(f"{where}empty prompt")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not prompt_ids:
        raise UserError(f"{where}prompt {prompt!r} tokenizes to nothing")
    return list(prompt_ids)


def encode(tokenizer, prompt: str, answer: str, name: str = "") -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids); an empty prompt or an answer without tokens is an error naming `name`."""
    prompt_ids = encode_prompt(tokenizer, prompt, name)
    answer_ids = tokenizer(continuation(prompt, answer), add_special_tokens=False)["input_ids"]
    if not answer_ids:
        raise UserError(f"{name + ': ' if name else ''}answer {answer!r} tokenizes to nothing")
    return prompt_ids, list(answer_ids)


def teacher_forced(prompt_ids: list[int], answer_ids: list[int]) -> list[tuple[list[int], int]]:
    """For each answer token k: (prompt + answer[:k], answer[k]); the input predicts it at its last position."""
    return [(prompt_ids + answer_ids[:k], answer_ids[k]) for k in range(len(answer_ids))]


def subject_positions(tokenizer, prompt: str, subject: str) -> list[int]:
    """Token positions of the prompt that overlap the first occurrence of `subject` (by character offsets)."""
    start = prompt.find(subject)
    if start < 0:
        raise UserError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    end = start + len(subject)
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    return [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
