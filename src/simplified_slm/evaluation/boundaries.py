"""Where an hnet_bit model puts its stage-0 chunk boundaries in a text (`slm boundaries`).

Word starts are the yardstick: a router that learned to chunk on its own tends to open
chunks at a space or a word start, so the report compares that fraction with what
boundaries placed without regard to the text would score (the chance fraction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from simplified_slm.errors import SLMError
from simplified_slm.models.hnet_bit import HNetBitForCausalLM


@dataclass
class BoundaryReport:
    """Stage 0's boundaries over one text, and how many sit at a space or a word start."""

    marked: str              # the text with "|" before every stage-0 boundary (except the first byte)
    num_tokens: int
    num_boundaries: int      # including the forced boundary at the first token
    word_start_fraction: float  # of the boundaries after the first: at a space or a word start
    chance_fraction: float      # of all positions after the first: at a space or a word start,
    # i.e. what boundaries placed without regard to the text would score on this text

    @property
    def tokens_per_chunk(self) -> float:
        return self.num_tokens / max(self.num_boundaries, 1)

    def summary(self) -> str:
        return (f"{self.num_boundaries} boundaries in {self.num_tokens} tokens "
                f"({self.tokens_per_chunk:.2f} per chunk); {100 * self.word_start_fraction:.1f}% "
                f"at a space or word start (chance on this text: {100 * self.chance_fraction:.1f}%)")


def _is_space(byte: int) -> bool:
    return chr(byte).isspace() if byte < 128 else False


@torch.no_grad()
def boundary_report(model: HNetBitForCausalLM, tokenizer: Any, text: str) -> BoundaryReport:
    """Run `text` through the model and report stage 0's boundaries."""
    ids = tokenizer.encode_ids(text)
    if not ids:
        raise SLMError("the text is empty; give at least one character to chunk")
    if not isinstance(model, HNetBitForCausalLM):
        raise SLMError(f"boundaries need an hnet_bit model, got family '{model.config.family}'")
    was_training = model.training
    model.eval()
    try:
        model(torch.tensor([ids], device=model.device))
    finally:
        model.train(was_training)
    marks = model.last_routing[0].boundary[0].tolist()
    # bytes of every token (byte tokenizer: the id; others: the token's decoded text)
    pieces: list[bytes] = ([bytes([i]) for i in ids] if getattr(tokenizer, "kind", None) == "byte"
                           else [tokenizer.decode([i]).encode("utf-8") for i in ids])
    data = b"".join(pieces)
    starts, offset = [], 0
    for piece in pieces:
        starts.append(offset)
        offset += len(piece)
    cuts: set[int] = set()
    at_word = word_edges = 0
    for t in range(1, len(ids)):
        this, prev = pieces[t], pieces[t - 1]
        on_edge = bool((this and _is_space(this[0])) or (prev and _is_space(prev[-1])))
        word_edges += on_edge
        if not marks[t]:
            continue
        pos = starts[t]
        while 0 < pos < len(data) and (data[pos] & 0xC0) == 0x80:  # never split a UTF-8 character
            pos -= 1
        if pos > 0:
            cuts.add(pos)
        at_word += on_edge
    out = bytearray()
    for pos, byte in enumerate(data):
        if pos in cuts:
            out += b"|"
        out.append(byte)
    later = sum(marks[1:])
    return BoundaryReport(out.decode("utf-8", errors="replace"), len(ids), sum(marks),
                          at_word / later if later else 0.0,
                          word_edges / (len(ids) - 1) if len(ids) > 1 else 0.0)


def mark_boundaries(model: HNetBitForCausalLM, tokenizer: Any, text: str) -> str:
    """The text with '|' before each stage-0 boundary, then a line with the boundary
    count, tokens per chunk and the fraction of boundaries at a space or word start.

    Use `boundary_report` for the numbers themselves.
    """
    report = boundary_report(model, tokenizer, text)
    return f"{report.marked}\n{report.summary()}"
