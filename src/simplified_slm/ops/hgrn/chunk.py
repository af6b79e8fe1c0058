"""Chunk-parallel HGRN recurrence in plain PyTorch, for training and prefill.

A Python loop over T tokens costs one interpreter round trip per token; at T=2048 with
autograd that dominates everything. Splitting time into K chunks of C tokens turns the
scan into about 2C vectorised steps, each over all chunks at once:

1. scan every chunk from a zero state (C steps over (N, K, D)) to get its end value,
2. carry the true state across chunks: start_{k+1} = A_k * start_k + end_k, where A_k is
   the product of the chunk's gates; this is the same recurrence over K steps, so it is
   solved by the same scan, recursively,
3. rescan every chunk from its true start, writing the output (C steps).

Products of gates only shrink toward 0, which is the correct limit, so nothing overflows;
the closed form exp(cumsum log f) * cumsum(i / exp(cumsum log f)) would divide by those
vanishing products and blow up for small gates. The tokens that do not fill a whole chunk
run sequentially, which avoids padded copies of the inputs.

The backward is the same chunked scan run backwards in time (`common.ScanFunction`), so
the loop is never recorded by autograd and saves only f, the output and the initial state.
"""

from __future__ import annotations

import math

import torch

from simplified_slm.ops.hgrn.common import ScanFunction, run_flattened, step_scan


def _chunk_size(length: int) -> int:
    """About sqrt(T) tokens per chunk, at most 64.

    Each in-chunk step touches one token of every chunk, so smaller chunks mean fewer but
    larger steps; once a step's slices no longer fit in L2 the running state is refetched
    from memory every step. Measured on 2 CPU threads (float32, fwd+bwd): at
    (B, T, D) = (4, 2048, 512) chunk sizes 24..64 are within noise and 8..16 are ~30%
    slower; at (16, 1024, 1024) 64 is best, 32 is ~15% slower and 128 ~60% slower.
    """
    return min(64, max(2, math.isqrt(length)))


def _chunked(
    x: torch.Tensor, a: torch.Tensor, h: torch.Tensor, out: torch.Tensor, size: int, reverse: bool
) -> torch.Tensor:
    """The three-pass scan of the module docstring over a length divisible by `size`."""
    chunks = x.shape[1] // size
    xs, gates, outs = (t.unflatten(1, (chunks, size)).unbind(2) for t in (x, a, out))
    order = range(size - 1, -1, -1) if reverse else range(size)
    # Only chunks followed by another one (in scan order) pass a state on.
    feeding = slice(1, None) if reverse else slice(None, -1)

    local = xs[order[0]][:, feeding].clone()
    for p in order[1:]:
        torch.addcmul(xs[p][:, feeding], gates[p][:, feeding], local, out=local)
    decay = a.unflatten(1, (chunks, size))[:, feeding].prod(dim=2)

    # The state entering each chunk obeys the same recurrence one level up
    # (start_next = decay * start + local), so scan it recursively.
    starts = torch.empty(x.shape[0], chunks, x.shape[2], dtype=x.dtype, device=x.device)
    entering = slice(None, -1) if reverse else slice(1, None)
    starts[:, -1 if reverse else 0] = h
    _scan(local, decay, h, starts[:, entering], _chunk_size(chunks - 1), reverse)

    state = starts
    for p in order:
        state = torch.addcmul(xs[p], gates[p], state, out=outs[p])
    return state[:, 0] if reverse else state[:, -1]


def _scan(
    x: torch.Tensor,
    a: torch.Tensor,
    h: torch.Tensor,
    out: torch.Tensor,
    chunk_size: int,
    reverse: bool,
) -> None:
    """Write out[:, t] = a[:, t] * out[:, t -/+ 1] + x[:, t] (state h before the first step).

    Whole chunks go through `_chunked`; the leftover tokens are stepped one by one, last
    in scan order.
    """
    length = x.shape[1]
    main = length // chunk_size * chunk_size
    if main:
        span = slice(length - main, length) if reverse else slice(0, main)
        h = _chunked(x[:, span], a[:, span], h, out[:, span], chunk_size, reverse)
    rest = range(length - main - 1, -1, -1) if reverse else range(main, length)
    step_scan(x, a, h, out, rest)


def _chunk_scan(x: torch.Tensor, a: torch.Tensor, h: torch.Tensor, out: torch.Tensor, reverse: bool) -> None:
    """The chunk-parallel scan at the chunk size of x's length (forward and backward)."""
    _scan(x, a, h, out, _chunk_size(x.shape[1]), reverse)


def _chunked_hgrn(i: torch.Tensor, f: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    return ScanFunction.apply(i, f, h0, _chunk_scan)


def chunk_hgrn(
    i: torch.Tensor,
    f: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HGRN over a whole sequence, chunk-parallel forward and backward.

    Same contract as `naive_recurrent_hgrn`: inputs (..., T, D) with time second to last,
    returns (o, final_state or None). Agrees with the reference to float rounding (the
    chunk passes use fused multiply-adds and a different association of the products).
    """
    return run_flattened(i, f, initial_state, output_final_state, _chunked_hgrn)
