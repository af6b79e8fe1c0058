"""Rotary position embeddings with every scaling users meet: none, linear, dynamic NTK, llama3.

One module serves every RoPE family (llama, bitnet, spiking transformer). Frequencies
follow transformers' definitions (`rope_type` names and fields as in a HF config.json), so a
checkpoint imported from transformers rotates exactly as it did there; the rotation uses
the "rotate half" layout transformers uses for Llama.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class RotaryEmbedding(nn.Module):
    """Callable as `rotary(q, k, position_ids)` by the shared attention."""

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: dict[str, Any] | None = None,
                 max_positions: int = 2048) -> None:
        super().__init__()
        self.head_dim, self.theta, self.scaling, self.max_positions = head_dim, theta, scaling, max_positions
        self.dynamic = rope_type(scaling) == "dynamic"
        self.register_buffer("inv_freq", rope_inverse_frequencies(head_dim, theta, scaling, max_positions),
                             persistent=False)

    def cos_sin(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if self.dynamic:
            seq_len = int(position_ids.max()) + 1
            if seq_len > self.max_positions:
                inv_freq = rope_inverse_frequencies(self.head_dim, self.theta, self.scaling, self.max_positions,
                                                    seq_len).to(inv_freq.device)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos(), angles.sin()

    def rotary_for(self, position_ids: torch.Tensor):
        """A `rotary(q, k, _)` callable with cos/sin computed once for all layers of a forward."""
        cos, sin = self.cos_sin(position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads

        def rotary(q: torch.Tensor, k: torch.Tensor, _: torch.Tensor | None = None):
            c, s = cos.to(q.dtype), sin.to(q.dtype)
            return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
        return rotary

    def forward(self, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary_for(position_ids)(q, k)
