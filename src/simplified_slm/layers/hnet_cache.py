"""Generation cache of the hierarchical HNetBit family.

Per stage (outer to inner): the encoder's and decoder's `RecurrentCache`, the router's key
of the last position seen (the next boundary probability compares against it) and the
dechunk EMA state z̄ of the chunk in progress. z̄ is also the vector every later position
of that chunk reuses as its upsampled main-network output, so one tensor serves as both
"EMA state" and "last main-network output". The main network keeps one more
`RecurrentCache`.

Decoding a byte runs stage 0's encoder, router and decoder (O(1)); the inner stages and
the main network run only for rows whose byte is a selected boundary, so a byte costs
O(1) amortised and the main network runs about once per chunk (`main_calls` counts it).

Rows of a batch leave a stage at different steps, so inner stages are stepped on a subset
of rows: `take_rows` gathers their states and `put_rows` writes them back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from simplified_slm.layers.recurrent_cache import RecurrentCache


def _take(t: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or rows is None else t.index_select(0, rows)


def _put(full: torch.Tensor | None, rows: torch.Tensor | None, part: torch.Tensor | None,
         batch_size: int) -> torch.Tensor | None:
    """Write `part` (states of `rows`) into `full`; a missing full state starts at zeros."""
    if part is None or rows is None:
        return part if rows is None else full
    if full is None:
        full = part.new_zeros((batch_size,) + tuple(part.shape[1:]))
    return full.index_copy(0, rows, part.to(full.dtype))


def take_rows(cache: RecurrentCache, rows: torch.Tensor | None) -> RecurrentCache:
    """A RecurrentCache holding only `rows` of `cache` (the cache itself when rows is None)."""
    if rows is None:
        return cache
    sub = RecurrentCache(len(cache.states))
    sub.states = [_take(s, rows) for s in cache.states]
    sub.length = cache.length
    return sub


def put_rows(cache: RecurrentCache, rows: torch.Tensor | None, sub: RecurrentCache, batch_size: int) -> None:
    """Write the states of `sub` (made by `take_rows`) back into `cache`."""
    if rows is None:
        return
    cache.states = [_put(full, rows, part, batch_size) for full, part in zip(cache.states, sub.states)]


@dataclass
class StageCache:
    """One H-Net stage: encoder/decoder states, last router key, dechunk EMA state."""

    encoder: RecurrentCache
    decoder: RecurrentCache
    key: torch.Tensor | None = None  # (B, D) (>= float32) router key of the last position
    ema: torch.Tensor | None = None  # (B, D) (>= float32) smoothed output of the current chunk

    def reorder(self, index: torch.Tensor) -> None:
        self.encoder.reorder(index)
        self.decoder.reorder(index)
        self.key = _take(self.key, index)
        self.ema = _take(self.ema, index)


@dataclass
class HNetBitCache:
    """Caches of every stage (outermost first) plus the main network's."""

    batch_size: int
    stages: list[StageCache]
    main: RecurrentCache
    length: int = 0       # bytes consumed so far
    main_calls: int = 0   # main-network invocations while decoding step by step
    chunks: list[int] = field(default_factory=list)  # boundaries selected per stage so far

    @classmethod
    def create(cls, batch_size: int, encoder_layers: list[int], decoder_layers: list[int],
               main_layers: int) -> "HNetBitCache":
        stages = [StageCache(RecurrentCache(e), RecurrentCache(d)) for e, d in zip(encoder_layers, decoder_layers)]
        return cls(batch_size, stages, RecurrentCache(main_layers), chunks=[0] * len(stages))

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def take_key_ema(self, stage: int, rows: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        st = self.stages[stage]
        return _take(st.key, rows), _take(st.ema, rows)

    def put_key_ema(self, stage: int, rows: torch.Tensor | None, key: torch.Tensor | None,
                    ema: torch.Tensor | None) -> None:
        st = self.stages[stage]
        if rows is None:
            st.key, st.ema = key, ema
        else:
            st.key = _put(st.key, rows, key, self.batch_size)
            st.ema = _put(st.ema, rows, ema, self.batch_size)

    def reorder(self, index: torch.Tensor) -> None:
        """Select / reorder batch rows (e.g. for beam search)."""
        for st in self.stages:
            st.reorder(index)
        self.main.reorder(index)
        self.batch_size = int(index.numel())
