"""Pre-allocated key/value cache for transformer decoding.

Allocating the whole cache once and writing into it keeps the per-token path free of
torch.cat re-allocations, which dominate decode time for small models on CPU. It lives in
`layers/` (not `generation/`) because attention writes into it directly.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys/values of every layer for `batch_size` sequences of up to `max_length` tokens."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 max_length: int, dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_length = max_length
        self.length = 0  # tokens already stored (same for every layer once a forward ends)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k/v for `layer`; return all keys/values so far (views)."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} tokens; cannot grow to {end}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, num_tokens: int) -> None:
        """Called by the model once every layer has stored the new tokens."""
        self.length += num_tokens

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (e.g. after dropping finished sequences)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
