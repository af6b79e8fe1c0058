"""Joining generation caches of separately prefilled groups into one running batch.

The server admits new requests between decode steps: their prompts are prefilled as a
group, then their cache rows join the running batch so every request shares each forward.
Attention caches of different lengths join right-aligned: the shorter one gets masked
slots on the left, which is exactly left padding (positions come from the attention mask),
so each row still equals its solo run. Recurrent states have no length and just stack.
Windowed (ring-buffer) KV layers cannot be shifted like that; `join` raises
`CannotJoin` for them and the scheduler runs such a group as a batch of its own.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from simplified_slm.layers.hnet_cache import HNetBitCache, StageCache
from simplified_slm.layers.kv_cache import KVCache
from simplified_slm.layers.mla import MLACache
from simplified_slm.layers.recurrent_cache import RecurrentCache


class CannotJoin(Exception):
    """These caches cannot share one batch (the caller keeps them as separate batches)."""


def join(model: Any, parts: Sequence[tuple[Any, int]], capacity: int) -> Any:
    """One cache holding the rows of every `(cache, rows)` in `parts`, in order.

    `capacity` is the number of token slots the joined attention cache must hold (the
    longest part's length plus what is still to be generated); recurrent caches ignore it.
    """
    caches = [c for c, _ in parts]
    kind = type(caches[0])
    if any(type(c) is not kind for c in caches):
        raise CannotJoin("different cache types")
    if kind is KVCache or kind is MLACache:
        return _join_attention(model, parts, capacity)
    if kind is RecurrentCache:
        return _join_recurrent(caches)
    if kind is HNetBitCache:
        return _join_hnet(caches)
    raise CannotJoin(f"no join for {kind.__name__}")


def trim_left(cache: Any, slots: int) -> None:
    """Drop the first `slots` token slots of an attention cache (padding in every row)."""
    if slots <= 0 or isinstance(cache, (RecurrentCache, HNetBitCache)):
        return
    if isinstance(cache, KVCache):
        cache.keys = [k[:, :, slots:] for k in cache.keys]
        cache.values = [v[:, :, slots:] for v in cache.values]
        cache.capacity = [c - slots for c in cache.capacity]
    else:
        cache.latents = [t[:, slots:] for t in cache.latents]
    cache.max_length -= slots
    cache.length -= slots


def _slot_tensors(cache: Any) -> tuple[list[torch.Tensor], int]:
    """The tensors holding token slots and the index of their slot dimension."""
    if isinstance(cache, KVCache):
        if any(c != cache.max_length for c in cache.capacity):
            raise CannotJoin("sliding-window (ring buffer) layers")
        return [*cache.keys, *cache.values], 2
    return cache.latents, 1


def _join_attention(model: Any, parts: Sequence[tuple[Any, int]], capacity: int) -> Any:
    length = max(c.length for c, _ in parts)
    out = model.make_cache(sum(n for _, n in parts), capacity)
    if out.max_length < capacity:
        raise CannotJoin("the joined rows would not fit the model's context")
    targets, dim = _slot_tensors(out)
    row = 0
    for cache, rows in parts:
        sources, _ = _slot_tensors(cache)
        for dst, src in zip(targets, sources):
            # right-aligned: the shorter cache's first slots stay zero and are masked
            dst[row:row + rows].narrow(dim, length - cache.length, cache.length).copy_(
                src.narrow(dim, 0, cache.length))
        row += rows
    out.length = length
    return out


def _cat(states: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    if all(s is None for s in states):
        return None
    if any(s is None for s in states):
        raise CannotJoin("a layer has a state in some groups only")
    return torch.cat(list(states), dim=0)


def _join_recurrent(caches: Sequence[RecurrentCache]) -> RecurrentCache:
    out = RecurrentCache(len(caches[0].states))
    out.states = [_cat(layer) for layer in zip(*(c.states for c in caches))]
    out.length = max(c.length for c in caches)
    return out


def _join_hnet(caches: Sequence[HNetBitCache]) -> HNetBitCache:
    stages = []
    for group in zip(*(c.stages for c in caches)):
        stages.append(StageCache(_join_recurrent([s.encoder for s in group]),
                                 _join_recurrent([s.decoder for s in group]),
                                 _cat([s.key for s in group]), _cat([s.ema for s in group])))
    return HNetBitCache(sum(c.batch_size for c in caches), stages, _join_recurrent([c.main for c in caches]),
                        length=max(c.length for c in caches), main_calls=sum(c.main_calls for c in caches),
                        chunks=[sum(n) for n in zip(*(c.chunks for c in caches))])
