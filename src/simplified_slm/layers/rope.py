"""Rotary position embeddings with every scaling users meet: none, linear, dynamic NTK, llama3.

One module serves every RoPE family (llama, bitnet, spiking transformer). Frequencies
follow transformers' definitions (`rope_type` names and fields as in a HF config.json), so a
checkpoint imported from transformers rotates exactly as it did there; the rotation uses
the "rotate half" layout transformers uses for Llama.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
QK = tuple[torch.Tensor, torch.Tensor]
Rotary = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], QK]


def rope_type(scaling: dict[str, Any] | None) -> str:
    """The scaling kind of a HF-style `rope_scaling` mapping (older configs say `type`)."""
    scaling = scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def validate_rope_scaling(scaling: dict[str, Any] | None) -> str | None:
    """Return an error message for a bad `rope_scaling` mapping, or None if it is usable."""
    if scaling is None:
        return None
    kind = rope_type(scaling)
    if kind not in ROPE_TYPES:
        return f"rope_type {kind!r} is not supported; use one of {list(ROPE_TYPES)}"
    needed = {"linear": ["factor"], "dynamic": ["factor"],
              "llama3": ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]}
    missing = [k for k in needed.get(kind, []) if k not in scaling]
    if missing:
        return f"rope_scaling of type {kind!r} needs {missing}"
    if kind != "default" and float(scaling["factor"]) < 1.0:
        return f"rope_scaling factor must be >= 1, got {scaling['factor']}"
    return None


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None = None,
                             max_positions: int = 2048, seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequency of each rotated pair (head_dim // 2 values), float32."""
    kind = rope_type(scaling)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    if kind == "dynamic" and seq_len is not None and seq_len > max_positions:
        # NTK-aware: grow the base with the length actually used beyond the trained context
        factor = float(scaling["factor"])
        theta = theta * ((factor * seq_len / max_positions) - (factor - 1)) ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / (theta ** exponents)
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        original = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths (low frequencies) are slowed by `factor`, short ones kept, and
        # the band between interpolated smoothly
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        return torch.where(medium, blended, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Callable as `rotary(q, k, position_ids)` by the shared attention.

    cos/sin come from a float32 table over positions that grows by doubling and is reused
    by every forward, so a decode step looks its row up instead of recomputing the
    angles. The table holds sin with the sign of transformers' `rotate_half` folded in, so
    rotating is `x * cos + roll(x) * sin`: bit-identical to `x * cos + rotate_half(x) * sin`
    (negating a product is exact) with one tensor op less per rotated tensor.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: dict[str, Any] | None = None,
                 max_positions: int = 2048) -> None:
        super().__init__()
        self.head_dim, self.theta, self.scaling, self.max_positions = head_dim, theta, scaling, max_positions
        self.dynamic = rope_type(scaling) == "dynamic"
        # a plain attribute, not a buffer: `model.half()` must not round the angles
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None

    def _cos_sin(self, position_ids: torch.Tensor, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = rope_inverse_frequencies(self.head_dim, self.theta, self.scaling, self.max_positions, seq_len)
        freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # (..., D/2)
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)

    def cos_sin(self, position_ids: torch.Tensor, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin, (*position_ids.shape, head_dim) float32.

        `length` (an upper bound on the positions, known to the caller) saves a sync.
        """
        if self.dynamic:
            seq_len = int(position_ids.max()) + 1
            if seq_len > self.max_positions:  # NTK-aware frequencies depend on the length: no table
                return self._cos_sin(position_ids, seq_len)
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            # traced for export: a cached table would freeze the traced length into the graph
            return self._cos_sin(position_ids)
        needed = length if length is not None else int(position_ids.max()) + 1
        table = self._table
        if table is None or table[0].shape[0] < needed or table[0].device != position_ids.device:
            size = max(256, 1 << (needed - 1).bit_length())
            table = self._table = self._cos_sin(torch.arange(size, device=position_ids.device))
        return table[0][position_ids], table[1][position_ids]

    def rotary_for(self, position_ids: torch.Tensor, length: int | None = None) -> Rotary:
        """A `rotary(q, k, _)` callable with cos/sin looked up once for all layers of a forward."""
        cos, sin = self.cos_sin(position_ids, length)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
        half = self.head_dim // 2

        def rotary(q: torch.Tensor, k: torch.Tensor, _: torch.Tensor | None = None) -> QK:
            c, s = cos.to(q.dtype), sin.to(q.dtype)
            return q * c + q.roll(half, -1) * s, k * c + k.roll(half, -1) * s
        return rotary

    def forward(self, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor) -> QK:
        return self.rotary_for(position_ids)(q, k)
