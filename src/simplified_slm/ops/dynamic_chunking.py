"""H-Net dynamic chunking: routing, downsampling, EMA dechunking, ratio loss.

Follows Hwang, Wang & Gu (2025), "Dynamic Chunking for End-to-End Hierarchical Sequence
Modeling", section 2.2:

- routing: q_t = W_q x_t, k_t = W_k x_t, boundary probability
  p_t = (1 - cos(q_t, k_{t-1})) / 2 with p_0 = 1, boundary b_t = [p_t >= 0.5].
  W_q and W_k are plain float `nn.Linear` layers initialised to the identity (the paper's
  choice), not ternary BitLinear: the boundary is a threshold on a cosine, so the router
  needs the continuous value of q.k (a ternary/int8 router quantises the very quantity it
  thresholds and its STE gradient is too coarse to move cosines around 0), and identity
  initialisation (p_t = dissimilarity of consecutive encoder outputs) is not representable
  by BitLinear's input RMSNorm + absmean scale. It is 2 d^2 weights per stage, a small
  fraction of the model; the cosine is computed in (at least) float32, outside autocast.
  The projections live in `layers/routing.py::RoutingModule`; `route` turns their
  normalised outputs into probabilities and boundaries.
- downsample: the boundary positions of every row, gathered into a padded tensor.
- dechunk: EMA over chunks z̄_k = P_k ẑ_k + (1 - P_k) z̄_{k-1}, P clamped to
  [1e-4, 1 - 1e-4], run with the project's HGRN scan (f = 1 - P, i = P ẑ), then upsampled
  (each byte takes the smoothed vector of the chunk it lies in) and multiplied by the
  confidence straight-through estimator ste(c_t) = c_t + stopgrad(1 - c_t), with
  c_t = p_t if b_t else 1 - p_t: forward value 1, gradient into the router.
- ratio loss with target compression N: F = fraction selected, G = mean p,
  L = N / (N - 1) * ((N - 1) F G + (1 - F)(1 - G)); it equals 1 at F = G = 1/N.

Layout of padded chunk sequences: **right-aligned** (padding first). A row with n chunks
out of L occupies slots L - n .. L - 1. Padding at the start is what the HGRN layers
already support (a masked position adds nothing to a zero state), so the state after the
last slot is every row's true final state; that is what lets a cached prefill hand exact
recurrent states to decoding even when rows have different numbers of chunks.
Masks use the same convention at every level: True = a real position; padding may only
precede (left padding) or follow (right padding) the real positions, never sit between.

Causality: p_t and b_t depend on bytes <= t; chunk k is made of the encoder output at its
first byte s_k, the main network is causal over chunks, and byte t reads the smoothed
vector of the chunk that contains it, i.e. of chunks starting at or before t.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from simplified_slm.ops.hgrn import hgrn

P_MIN = 1e-4  # EMA probabilities are clamped to [P_MIN, 1 - P_MIN]


class Routing(NamedTuple):
    prob: torch.Tensor      # (B, T) boundary probability p_t (0 at masked positions), >= float32
    boundary: torch.Tensor  # (B, T) bool b_t = p_t >= 0.5 (False at masked positions)
    key: torch.Tensor       # (B, T, D) normalised k_t (>= float32); the last continues a sequence


class Chunks(NamedTuple):
    x: torch.Tensor         # (B, L, D) selected positions, right-aligned, zeros in padding
    mask: torch.Tensor      # (B, L) bool, True at real chunks
    src: torch.Tensor       # (B, L) long, position each chunk was taken from (0 in padding)
    slot: torch.Tensor      # (B, T) long, chunk slot each position belongs to


def route(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None,
          prev_key: torch.Tensor | None = None) -> Routing:
    """Boundary probabilities p_t = (1 - cos(q_t, k_{t-1})) / 2 from unit-norm q, k (B, T, D).

    `prev_key` (B, D) is the key of the position before q[:, 0] when continuing a
    sequence (decoding); without it the first position (or the first real one under
    `mask`) is a boundary with p = 1. Masked positions get p = 0 and no boundary.
    """
    if prev_key is None:
        prev = F.pad(k[:, :-1], (0, 0, 1, 0))
    else:
        prev = torch.cat([prev_key[:, None].to(k.dtype), k[:, :-1]], dim=1)
    prob = ((1 - (q * prev).sum(-1)) / 2).clamp(0.0, 1.0)
    if mask is None:
        if prev_key is None:
            prob = torch.cat([torch.ones_like(prob[:, :1]), prob[:, 1:]], dim=1)
    else:
        if prev_key is None:  # the first real position of each row opens its first chunk
            first = mask & (mask.long().cumsum(1) == 1)
            prob = torch.where(first, torch.ones_like(prob), prob)
        prob = torch.where(mask, prob, torch.zeros_like(prob))
    return Routing(prob, prob >= 0.5, k)


def downsample(x: torch.Tensor, boundary: torch.Tensor) -> Chunks:
    """Gather the boundary positions of each row of `x` (B, T, D) into right-aligned chunks.

    Every row must have at least one boundary (the first real position always is one).
    """
    batch, length, dim = x.shape
    counts = boundary.sum(1)                                   # (B,)
    num_chunks = max(int(counts.max()), 1)
    cum = boundary.long().cumsum(1)                            # chunk number (1-based) so far
    offset = num_chunks - counts                               # first real slot of each row
    rows, cols = boundary.nonzero(as_tuple=True)
    src = torch.zeros(batch, num_chunks, dtype=torch.long, device=x.device)
    src[rows, offset[rows] + cum[rows, cols] - 1] = cols
    mask = torch.arange(num_chunks, device=x.device)[None] >= offset[:, None]
    chunks = x.gather(1, src[..., None].expand(-1, -1, dim)) * mask[..., None].to(x.dtype)
    slot = (offset[:, None] + cum - 1).clamp(min=0)
    return Chunks(chunks, mask, src, slot)


def ema_dechunk(z: torch.Tensor, prob: torch.Tensor, mask: torch.Tensor | None = None,
                initial_state: torch.Tensor | None = None,
                output_final_state: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """z̄_k = P_k z_k + (1 - P_k) z̄_{k-1} over chunks, as one HGRN scan (no Python loop).

    z (B, L, D) main-network outputs per chunk, prob (B, L) the boundary probability of
    each chunk's first position (clamped here), mask (B, L) real chunks: padded slots add
    nothing, so with right-aligned chunks the state stays at `initial_state` (zero) until a
    row's first chunk. Computed in at least float32; returns (z̄ in z's dtype, final state
    (B, D) or None).
    """
    dtype = torch.promote_types(z.dtype, torch.float32)  # at least float32 (bf16 autocast)
    p = prob.to(dtype).clamp(P_MIN, 1 - P_MIN)[..., None]
    i = p * z.to(dtype)
    if mask is not None:
        i = i * mask[..., None].to(dtype)
    f = (1 - p).expand_as(i).contiguous()
    h0 = initial_state.to(dtype) if initial_state is not None else None
    smoothed, final = hgrn(i, f, h0, output_final_state)
    return smoothed.to(z.dtype), final


def ema_step(state: torch.Tensor | None, z: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
    """One EMA step for decoding: state (N, D) or None (zeros), z (N, D), prob (N,)."""
    dtype = torch.promote_types(z.dtype, torch.float32)
    p = prob.to(dtype).clamp(P_MIN, 1 - P_MIN)[:, None]
    i = p * z.to(dtype)
    if state is None:
        return i
    return (1 - p) * state + i  # multiply then add, like the scan's sequential steps


def upsample(smoothed: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """Each position takes the smoothed vector of its chunk: (B, L, D), (B, T) -> (B, T, D)."""
    return smoothed.gather(1, slot[..., None].expand(-1, -1, smoothed.shape[-1]))


def confidence_ste(prob: torch.Tensor, boundary: torch.Tensor) -> torch.Tensor:
    """ste(c) with c = p if b else 1 - p: value 1 in the forward, gradient dc in the backward."""
    c = torch.where(boundary, prob, 1 - prob)
    return c + (1 - c).detach()


def ratio_loss(prob: torch.Tensor, boundary: torch.Tensor, target: float,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """H-Net's compression-ratio loss (unweighted, per stage).

    Equals 1 at F = G = 1/target; G carries the gradient, and since F follows G through
    the 0.5 threshold, minimising it pulls the selected fraction F toward 1/target.
    """
    n = float(target)
    if mask is None:
        frac = boundary.float().mean()
        mean_p = prob.float().mean()
    else:
        m = mask.float()
        total = m.sum().clamp(min=1)
        frac = (boundary.float() * m).sum() / total
        mean_p = (prob.float() * m).sum() / total
    return n / (n - 1) * ((n - 1) * frac * mean_p + (1 - frac) * (1 - mean_p))
