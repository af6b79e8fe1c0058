"""Generation cache of recurrent families: one fixed-size state per layer.

Unlike a KV cache it never grows, which is what makes a new token cost O(1) in the length
of the text so far.
"""

from __future__ import annotations

import torch


class RecurrentCache:
    """Per-layer recurrent states (None until a layer has seen its first token)."""

    def __init__(self, num_layers: int) -> None:
        self.states: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0  # tokens consumed so far

    def get(self, layer: int) -> torch.Tensor | None:
        return self.states[layer]

    def set(self, layer: int, state: torch.Tensor) -> None:
        self.states[layer] = state

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def reorder(self, index: torch.Tensor) -> None:
        self.states = [s.index_select(0, index) if s is not None else None for s in self.states]
