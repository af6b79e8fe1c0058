"""Pre-allocated key/value cache for transformer decoding, bounded for sliding-window layers.

Allocating the whole cache once and writing into it keeps the per-token path free of
torch.cat re-allocations, which dominate decode time for small models on CPU. It lives in
`layers/` (not `generation/`) because attention writes into it directly.

A layer with a sliding window of W tokens never looks further back than W - 1 tokens, so
its cache is a ring buffer of min(W, max_length) slots: slot `p % W` holds position p, and
memory stays bounded however long generation runs. Keys carry their rotary position
already, so the order of slots does not matter to attention; only the mask has to know
which position each slot holds (`key_positions`).

The storage dtype may be narrower than the model's (`to_dtype(torch.bfloat16)`, what
`generate(kv_cache_dtype="bf16")` asks for): a bf16 cache halves the memory of long
contexts; keys and values are rounded once when stored and handed back to attention in the
dtype of the new keys, so the model computes as before.
"""

from __future__ import annotations

from typing import Sequence

import torch

from simplified_slm.errors import SLMError

# names `generate(kv_cache_dtype=...)` and `--kv-cache-dtype` accept
KV_CACHE_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                   "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_kv_cache_dtype(name: str | torch.dtype) -> torch.dtype:
    """The storage dtype for a KV cache from its name (`bf16`, `fp16`, `fp32`) or a dtype."""
    if isinstance(name, torch.dtype):
        if name not in KV_CACHE_DTYPES.values():
            raise SLMError(f"KV cache dtype {name} is not supported; use one of bf16, fp16, fp32")
        return name
    if name not in KV_CACHE_DTYPES:
        raise SLMError(f"unknown KV cache dtype {name!r}; use one of bf16, fp16, fp32")
    return KV_CACHE_DTYPES[name]


class KVCache:
    """Keys/values of every layer for `batch_size` sequences of up to `max_length` tokens.

    `windows[i]` is layer i's sliding window (None: full attention, the default for all).
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 max_length: int, dtype: torch.dtype, device: torch.device | str,
                 windows: Sequence[int | None] | None = None) -> None:
        windows = [None] * num_layers if windows is None else list(windows)
        if len(windows) != num_layers:
            raise SLMError(f"KVCache got {len(windows)} windows for {num_layers} layers; give one per layer")
        self.capacity = [max_length if w is None else min(w, max_length) for w in windows]
        self.keys = [torch.zeros(batch_size, num_kv_heads, c, head_dim, dtype=dtype, device=device)
                     for c in self.capacity]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.max_length = max_length
        self.length = 0  # tokens already stored (same for every layer once a forward ends)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k/v for `layer`; return the keys/values attention must see.

        Those are positions 0..end-1 until a ring layer wraps; after that, one new token sees
        the whole ring (its window), and several new tokens see the ring as it was plus
        themselves (a copy), after which the ring keeps the newest of them.
        """
        capacity, start = self.capacity[layer], self.length
        end = start + k.shape[2]
        if end > self.max_length:
            raise SLMError(f"KV cache holds {self.max_length} tokens; cannot grow to {end}")
        keys, values = self.keys[layer], self.values[layer]
        if end <= capacity:
            keys[:, :, start:end] = k
            values[:, :, start:end] = v
            return self._as(keys[:, :, :end], k), self._as(values[:, :, :end], v)
        if k.shape[2] == 1:
            # the slot overwritten holds position start - capacity, just outside the window
            # (a slice, not an integer index: torch.compile would specialise on each slot)
            slot = start % capacity
            keys[:, :, slot:slot + 1] = k
            values[:, :, slot:slot + 1] = v
            return self._as(keys, k), self._as(values, v)
        filled = min(start, capacity)
        seen_k = torch.cat([self._as(keys[:, :, :filled], k), k], dim=2)
        seen_v = torch.cat([self._as(values[:, :, :filled], v), v], dim=2)
        keep = min(k.shape[2], capacity)
        slots = torch.arange(end - keep, end, device=keys.device) % capacity
        keys.index_copy_(2, slots, k[:, :, -keep:])
        values.index_copy_(2, slots, v[:, :, -keep:])
        return seen_k, seen_v

    @staticmethod
    def _as(stored: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Stored keys/values in the dtype attention computes in (that of the new ones)."""
        return stored if stored.dtype == new.dtype else stored.to(new.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype if self.keys else torch.float32

    def to_dtype(self, dtype: torch.dtype) -> "KVCache":
        """Store keys and values as `dtype` from now on (those already stored are converted)."""
        self.keys = [k.to(dtype) for k in self.keys]
        self.values = [v.to(dtype) for v in self.values]
        return self

    def key_positions(self, layer: int, q_len: int) -> torch.Tensor | None:
        """Position of each key `update(layer, ...)` will return for `q_len` new tokens.

        None means the plain layout 0..length+q_len-1 (every full-attention layer, and a
        ring layer until it wraps). For one new token on a wrapped ring these are exactly
        the newest `capacity` positions, in slot order.
        """
        capacity, start = self.capacity[layer], self.length
        end = start + q_len
        if end <= capacity:
            return None
        device = self.keys[layer].device
        if q_len == 1:
            slots = torch.arange(capacity, device=device)
            return start - (start - slots) % capacity
        filled = min(start, capacity)
        slots = torch.arange(filled, device=device)
        return torch.cat([(start - 1) - (start - 1 - slots) % capacity, torch.arange(start, end, device=device)])

    def advance(self, num_tokens: int) -> None:
        """Called by the model once every layer has stored the new tokens."""
        self.length += num_tokens

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (e.g. after dropping finished sequences)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]

    def nbytes(self) -> int:
        """Memory held by the keys and values of all layers."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))
