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

The backward is the same scan run backwards in time (custom autograd.Function), so the
loop is never recorded by autograd and saves only f, the output and the initial state.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from simplified_slm.ops.hgrn.naive import flatten_hgrn_inputs


def _chunk_size(length: int) -> int:
    """About sqrt(T) tokens per chunk, at most 64.

    Each in-chunk step touches one token of every chunk, so smaller chunks mean fewer but
    larger steps; once a step's slices no longer fit in L2 the running state is refetched
    from memory every step. Measured on 2 CPU threads (float32, fwd+bwd): at
    (B, T, D) = (4, 2048, 512) chunk sizes 24..64 are within noise and 8..16 are ~30%
    slower; at (16, 1024, 1024) 64 is best, 32 is ~15% slower and 128 ~60% slower.
    """
    return min(64, max(2, math.isqrt(length)))


def _sequential(
    x: torch.Tensor, a: torch.Tensor, h: torch.Tensor, out: torch.Tensor, steps: range
) -> torch.Tensor:
    """out[:, t] = a[:, t] * h + x[:, t] for t in `steps`, h being the previous output.

    Multiply then add, like the naive reference, so the sequential form matches it bit
    for bit (addcmul fuses into an FMA and rounds differently).
    """
    for t in steps:
        out_t = out[:, t]
        torch.mul(a[:, t], h, out=out_t)
        out_t.add_(x[:, t])
        h = out_t
    return h


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
    chunk_size: int | None,
    reverse: bool,
) -> None:
    """Write out[:, t] = a[:, t] * out[:, t -/+ 1] + x[:, t] (state h before the first step).

    Whole chunks go through `_chunked`; the leftover tokens (all of them when
    `chunk_size` is None) are stepped one by one, last in scan order.
    """
    length = x.shape[1]
    main = 0 if chunk_size is None else length // chunk_size * chunk_size
    if main:
        span = slice(length - main, length) if reverse else slice(0, main)
        h = _chunked(x[:, span], a[:, span], h, out[:, span], chunk_size, reverse)
    rest = range(length - main - 1, -1, -1) if reverse else range(main, length)
    _sequential(x, a, h, out, rest)


class _HGRNFunction(torch.autograd.Function):
    """h_t = f_t * h_{t-1} + i_t on (N, T, D) with the reversed scan as backward.

    Backward: g_t = dO_t + f_{t+1} g_{t+1} (the gradient reaching h_t), then
    di_t = g_t, df_t = g_t * h_{t-1}, d initial_state = f_0 * g_0.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        i: torch.Tensor,
        f: torch.Tensor,
        h0: torch.Tensor | None,
        chunked: bool,
    ) -> torch.Tensor:
        length = i.shape[1]
        o = torch.empty(i.shape, dtype=i.dtype, device=i.device)
        h = torch.zeros_like(i[:, 0]) if h0 is None else h0
        _scan(i, f, h, o, _chunk_size(length) if chunked else None, reverse=False)
        ctx.save_for_backward(f, o, h0)
        return o

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, do: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None]:
        f, o, h0 = ctx.saved_tensors
        length = f.shape[1]
        g = torch.empty(do.shape, dtype=do.dtype, device=do.device)
        g[:, -1] = do[:, -1]
        # Step t of the reversed scan uses the gate of token t+1: f[:, 1:] lines up with
        # do[:, :-1] as views, so nothing is shifted into a copy.
        _scan(do[:, :-1], f[:, 1:], g[:, -1], g[:, :-1], _chunk_size(length - 1), reverse=True)

        df = None
        if ctx.needs_input_grad[1]:
            df = torch.empty_like(g)
            torch.mul(g[:, 1:], o[:, :-1], out=df[:, 1:])
            if h0 is None:
                df[:, 0].zero_()
            else:
                torch.mul(g[:, 0], h0, out=df[:, 0])
        dh0 = f[:, 0] * g[:, 0] if ctx.needs_input_grad[2] else None
        di = g if ctx.needs_input_grad[0] else None
        return di, df, dh0, None


def scan_hgrn(
    i: torch.Tensor,
    f: torch.Tensor,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    scan: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shared entry of the fast forms: check and flatten to (N, T, D), run `scan`, unflatten.

    The final state is cloned out of the output so a decoding cache holding it does not
    keep the whole prefill output alive.
    """
    i3, f3, h0 = flatten_hgrn_inputs(i, f, initial_state)
    o3 = scan(i3, f3, h0)
    final = None
    if output_final_state:
        final = o3[:, -1].clone().reshape(i.shape[:-2] + i.shape[-1:])
    return o3.reshape(i.shape), final


def chunked_scan(i: torch.Tensor, f: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """The chunk-parallel forward and backward on flattened (N, T, D) inputs."""
    return _HGRNFunction.apply(i, f, h0, True)


def stepped_scan(i: torch.Tensor, f: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """One in-place step per token (decoding), with the chunk-parallel backward."""
    return _HGRNFunction.apply(i, f, h0, False)


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
    return scan_hgrn(i, f, initial_state, output_final_state, chunked_scan)
