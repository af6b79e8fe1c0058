"""Held-out scores of a chat fine-tune: per-example answer loss and exact-match accuracy.

Exact match generates greedily from the prompt rendered with the template's generation
prompt (as `slm chat` and the server prompt), extracts the final answer from the reply and
from the reference, and compares them. The final answer is the number after GSM8K's
"####", else after the last "answer is", else the last number in the text (commas and a
trailing ".0" dropped), else the whole reply stripped. Used by the trainer's evaluation
(`train.eval_exact_match`) and by `benchmarks/finetune_arith.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from simplified_slm.data.chat import IGNORE, ChatExample, pad_examples
from simplified_slm.generation.generate import left_pad
from simplified_slm.tokenizers.base import Tokenizer
from simplified_slm.tokenizers.chat_template import ChatTemplate

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


def _normal_number(text: str) -> str:
    text = text.replace(",", "")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def extract_answer(text: str) -> str:
    """The final answer of a worked reply (see the module docstring)."""
    for marker in (r"####\s*", r"answer is\s*:?\s*\$?"):
        found = re.findall(marker + f"({_NUMBER})", text, flags=re.IGNORECASE)
        if found:
            return _normal_number(found[-1])
    numbers = re.findall(_NUMBER, text)
    return _normal_number(numbers[-1]) if numbers else text.strip()


def answers_match(reply: str, reference: str) -> bool:
    return extract_answer(reply) == extract_answer(reference)


@dataclass
class ExactMatch:
    accuracy: float
    replies: list[str]  # the generated replies, in example order
    correct: list[bool]


@torch.no_grad()
def exact_match(model: Any, tokenizer: Tokenizer, template: ChatTemplate, examples: Sequence[ChatExample],
                max_new_tokens: int | None = None, batch_size: int = 16,
                device: torch.device | str = "cpu") -> ExactMatch:
    """Greedy replies to each example's prompt, scored against its reference answer.

    `max_new_tokens` defaults to 1.5x the longest reference in tokens + 8. Generation stops
    at the tokenizer's eos and at the template's stop strings.
    """
    if max_new_tokens is None:
        longest = max(len(tokenizer.encode_ids(e.reference)) for e in examples)
        max_new_tokens = int(longest * 1.5) + 8
    was_training = model.training
    model.eval()
    stops = template.extra_stop
    replies: list[str] = []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            prompts = [tokenizer.encode_ids(template.render(e.prompt, add_generation_prompt=True)) for e in chunk]
            ids, mask = left_pad(prompts, device=device)
            out = model.generate(ids, max_new_tokens, greedy=True, attention_mask=mask,
                                 eos_token_id=tokenizer.eos_token_id)
            for row in out[:, ids.shape[1]:].tolist():
                if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in row:
                    row = row[:row.index(tokenizer.eos_token_id)]
                text = tokenizer.decode(row)
                for stop in stops:
                    text = text.split(stop)[0]
                replies.append(text)
    finally:
        model.train(was_training)
    correct = [answers_match(r, e.reference) for r, e in zip(replies, examples)]
    return ExactMatch(sum(correct) / max(1, len(correct)), replies, correct)


@torch.no_grad()
def answer_losses(model: Any, examples: Sequence[ChatExample], block_size: int, batch_size: int = 16,
                  device: torch.device | str = "cpu", amp: torch.dtype | None = None) -> list[float]:
    """Each example's mean cross-entropy over its answer tokens (nats/token), in order."""
    was_training = model.training
    model.eval()
    losses: list[float] = []
    try:
        for start in range(0, len(examples), batch_size):
            x, y = pad_examples(examples[start:start + batch_size], block_size)
            x, y = x.to(device), y.to(device)
            with torch.autocast(torch.device(device).type, dtype=amp, enabled=amp is not None):
                logits = model(x).logits
            nats = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=IGNORE,
                                                     reduction="none").sum(1)
            counts = (y != IGNORE).sum(1).clamp(min=1)
            losses += (nats / counts).tolist()
    finally:
        model.train(was_training)
    return losses


def chat_validation(model: Any, tokenizer: Tokenizer, template: ChatTemplate, examples: Sequence[ChatExample],
                    block_size: int, exact_match_examples: int = 0, device: torch.device | str = "cpu",
                    amp: torch.dtype | None = None) -> dict[str, float]:
    """The trainer's validation of a chat run: `loss` = the mean of the per-example answer
    losses, and `exact_match` on the first `exact_match_examples` examples when > 0."""
    losses = answer_losses(model, examples, block_size, device=device, amp=amp)
    out = {"loss": sum(losses) / len(losses), "examples": float(len(losses))}
    if exact_match_examples > 0:
        out["exact_match"] = exact_match(model, tokenizer, template, examples[:exact_match_examples],
                                         device=device).accuracy
    return out
