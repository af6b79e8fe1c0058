"""Turning next-token logits into a choice: greedy, temperature, top-k, top-p, repetition penalty.

Pure functions on (batch, vocab) tensors so every family and the CLI share them.
"""

from __future__ import annotations

import torch


def apply_repetition_penalty(logits: torch.Tensor, previous: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty: divide positive / multiply negative logits of tokens already seen."""
    if penalty == 1.0:
        return logits
    seen = torch.gather(logits, 1, previous)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, previous, seen)


def filter_top_k(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    if not top_k or top_k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, top_p: float | None) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches `top_p` (nucleus)."""
    if top_p is None or top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(-1)
    # drop a token when the mass before it already reaches top_p (the top token always stays)
    drop_sorted = probs.cumsum(-1) - probs >= top_p
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def choose_next(logits: torch.Tensor, previous: torch.Tensor | None = None, *, greedy: bool = False,
                temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                repetition_penalty: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token id per row of `logits` (batch, vocab)."""
    logits = logits.float()
    if previous is not None:
        logits = apply_repetition_penalty(logits, previous, repetition_penalty)
    if greedy or temperature <= 0.0:
        return logits.argmax(-1)
    logits = filter_top_p(filter_top_k(logits / temperature, top_k), top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
