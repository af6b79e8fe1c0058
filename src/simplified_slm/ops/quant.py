"""Weight-only quantization: the packed formats and their pure-PyTorch reference.

Schemes (GGUF's names; the value of one weight `w` from its code `q`):

| scheme | code           | per group            | w              |
|--------|----------------|----------------------|----------------|
| q8_0   | int8           | scale d (fp16)       | q * d          |
| q4_0   | 4-bit, 0..15   | scale d (fp16)       | (q - 8) * d    |
| q4_1   | 4-bit, 0..15   | scale d, min m (fp16)| q * d + m      |
| bf16 / fp16 | the weight in that dtype, no groups                  |

Groups run along the input dimension (32, 64 or 128 weights; 32 is GGUF's block). The
layout is the one the C kernel (`quant_native.py`) streams, kept in separate contiguous
arrays so a GGUF block copies in without passing through float:
- `codes`: (out, in) int8 for q8_0; (out, in / 2) uint8 for 4-bit, packed per 32 weights as
  GGUF does: byte j of a 32-block holds weight j in its low nibble and weight j + 16 in
  its high nibble (also when a scale covers 64 or 128 weights).
- `scales`, `mins`: (out, in / group) float16; `mins` is empty except for q4_1.

`quantize` rounds exactly as gguf's reference quantizers (and llama.cpp) do, so at group 32
its blocks are byte-identical to `gguf.quants.quantize`. The matmul reference comes in the
two numerics the fast paths use (see `reference_matmul`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from simplified_slm.errors import SLMError

BLOCK = 32  # weights per packed 4-bit block and per activation block: GGUF's QK
INT_SCHEMES = ("q8_0", "q4_0", "q4_1")
FLOAT_SCHEMES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SCHEMES = INT_SCHEMES + tuple(FLOAT_SCHEMES)
GROUP_SIZES = (32, 64, 128)

# GGUF block layouts: bytes per 32 weights, and the fp16 header fields before the codes.
_GGUF_BLOCKS = {"Q8_0": ("q8_0", 34, 1), "Q4_0": ("q4_0", 18, 1), "Q4_1": ("q4_1", 20, 2)}


@dataclass(frozen=True)
class QuantizedWeight:
    """One (out_features, in_features) weight in a packed scheme: plain tensors + metadata.

    For bf16/fp16, `codes` is the weight itself and `scales`/`mins` are empty.
    """

    scheme: str
    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor
    shape: tuple[int, int]
    group_size: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.mins))


def check_scheme(scheme: str, in_features: int, group_size: int) -> None:
    """Raise one-line SLMErrors for an unknown scheme or a group size the shape cannot take."""
    if scheme not in SCHEMES:
        raise SLMError(f"unknown quantization scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    if scheme in FLOAT_SCHEMES:
        return
    if group_size not in GROUP_SIZES:
        raise SLMError(f"group size {group_size} is not supported; use one of {GROUP_SIZES}")
    if in_features % group_size:
        raise SLMError(f"in_features {in_features} is not divisible by group size {group_size}; "
                       f"use a group size that divides it or skip this layer")


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (what llama.cpp and gguf use), not torch.round's half-to-even."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, torch.ones_like(d), d))


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(rows, in) codes 0..15 -> (rows, in / 2) uint8, GGUF order within each 32-block."""
    rows, cols = q.shape
    blocks = q.to(torch.uint8).reshape(rows, cols // BLOCK, 2, BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(rows, cols // 2)


def unpack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_nibbles`: (rows, in / 2) uint8 -> (rows, in) uint8 codes 0..15."""
    rows, half = codes.shape
    blocks = codes.reshape(rows, half * 2 // BLOCK, 1, BLOCK // 2)
    return torch.cat([blocks & 0x0F, blocks >> 4], dim=2).reshape(rows, half * 2)


def quantize(weight: torch.Tensor, scheme: str, group_size: int = 32) -> QuantizedWeight:
    """Pack a float (out, in) weight; rounding follows llama.cpp's reference quantizers."""
    out_features, in_features = weight.shape
    check_scheme(scheme, in_features, group_size)
    empty = torch.empty(0, dtype=torch.float16)
    if scheme in FLOAT_SCHEMES:
        codes = weight.detach().to(FLOAT_SCHEMES[scheme]).contiguous()
        return QuantizedWeight(scheme, codes, empty, empty, (out_features, in_features), 0)
    w = weight.detach().to(torch.float32).reshape(out_features, in_features // group_size, group_size)
    mins = empty
    if scheme == "q8_0":
        d = w.abs().amax(-1, keepdim=True) / 127
        codes = _round_half_away(w * _inverse(d)).to(torch.int8).reshape(out_features, in_features)
    elif scheme == "q4_0":
        peak = torch.gather(w, -1, w.abs().argmax(-1, keepdim=True))  # signed value of largest |w|
        d = peak / -8
        q = torch.trunc(w * _inverse(d) + 8.5).clamp(0, 15)
        codes = pack_nibbles(q.reshape(out_features, in_features))
    else:
        low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        d = (high - low) / 15
        q = torch.trunc((w - low) * _inverse(d) + 0.5).clamp(0, 15)
        codes = pack_nibbles(q.reshape(out_features, in_features))
        mins = low.squeeze(-1).to(torch.float16).contiguous()
    scales = d.squeeze(-1).to(torch.float16).contiguous()
    return QuantizedWeight(scheme, codes.contiguous(), scales, mins, (out_features, in_features), group_size)


def dequantize(qw: QuantizedWeight, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 weight (or only `rows`, e.g. embedding lookups), computed in float32 as
    gguf's dequantizers do: d * q (+ m), so GGUF blocks decode to the same bits."""
    codes, scales, mins = qw.codes, qw.scales, qw.mins
    if qw.scheme in FLOAT_SCHEMES:
        return (codes if rows is None else codes[rows]).to(torch.float32)
    if rows is not None:
        codes, scales = codes[rows], scales[rows]
        mins = mins[rows] if qw.scheme == "q4_1" else mins
    lead = codes.shape[:-1]
    codes, scales = codes.reshape(-1, codes.shape[-1]), scales.reshape(-1, scales.shape[-1]).float()
    if qw.scheme == "q8_0":
        q = codes.to(torch.float32)
    else:
        q = unpack_nibbles(codes).to(torch.float32)
        if qw.scheme == "q4_0":
            q = q - 8
    q = q.reshape(q.shape[0], -1, qw.group_size)
    w = scales.unsqueeze(-1) * q
    if qw.scheme == "q4_1":
        w = w + mins.reshape(-1, mins.shape[-1]).float().unsqueeze(-1)
    return w.reshape(*lead, qw.shape[1])


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> int8 codes (M, K) and float32 scales (M, K / 32): llama.cpp's Q8_0
    for activations (d = max|x| / 127, codes rounded half away from zero)."""
    m, k = x.shape
    blocks = x.to(torch.float32).reshape(m, k // BLOCK, BLOCK)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    q = _round_half_away(blocks * _inverse(d)).to(torch.int8)
    return q.reshape(m, k), d.squeeze(-1)


# Weights of W widened at a time by the reference matmul: 2**18 are 1 MB in float32, so a
# 1B model's 128256 x 2048 head never needs its 1 GB float copy. Small on purpose: glibc
# keeps freed multi-MB temporaries resident once its mmap threshold has risen (measured:
# +17 MB RSS per 16 MB slice, +2 MB per 1 MB slice, over a 32768 x 2048 weight).
_REFERENCE_CHUNK = 1 << 18


def reference_matmul(x: torch.Tensor, qw: QuantizedWeight, quantized_activations: bool = True) -> torch.Tensor:
    """y = x @ W^T for a packed W, in one of the two numerics the fast paths compute.

    quantized_activations=True is what the small-batch C kernel does (as llama.cpp's
    vec_dot): x is quantized to int8 per 32-block, each block's integer dot product with the
    weight codes is exact, then scaled by d_w * d_x (and q4_1 adds m * d_x * sum(q_x)).
    False is x @ dequantize(W)^T in float32, what large batches (prefill) compute.
    Float schemes always multiply in float32. W is widened a slice of rows at a time, so
    memory stays bounded by the packed weight where no C kernel is built.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    rows = max(1, _REFERENCE_CHUNK // k)
    if not quantized_activations or qw.scheme in FLOAT_SCHEMES:
        x32 = x2.to(torch.float32)
        y = torch.cat([x32 @ dequantize(part).T for part in row_slices(qw, rows)], dim=-1)
        return y.reshape(*lead, qw.shape[0]).to(x.dtype)
    qx, dx = quantize_activations(x2)
    y = torch.cat([_exact_block_dots(qx, dx, part) for part in row_slices(qw, rows)], dim=-1)
    return y.reshape(*lead, qw.shape[0]).to(x.dtype)


def reference_grad_input(g: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """g @ W in float32 (the gradient of x @ W^T for x), W widened a slice of rows at a time
    as in `reference_matmul`."""
    g = g.to(torch.float32)
    gx = g.new_zeros(g.shape[0], qw.shape[1])
    start, rows = 0, max(1, _REFERENCE_CHUNK // qw.shape[1])
    for part in row_slices(qw, rows):
        gx.addmm_(g[:, start:start + part.shape[0]], dequantize(part))
        start += part.shape[0]
    return gx


def row_slices(qw: QuantizedWeight, rows: int) -> list[QuantizedWeight]:
    """W cut into consecutive slices of `rows` output rows (views, no copies): how the
    reference and the C path's prefill work through a large weight."""
    def cut(t: torch.Tensor, start: int) -> torch.Tensor:
        return t[start:start + rows] if t.numel() else t
    return [QuantizedWeight(qw.scheme, cut(qw.codes, i), cut(qw.scales, i), cut(qw.mins, i),
                            (min(rows, qw.shape[0] - i), qw.shape[1]), qw.group_size)
            for i in range(0, qw.shape[0], rows)]


def _exact_block_dots(qx: torch.Tensor, dx: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """The quantized-activation product of int8 x codes (M, K) with one slice of W."""
    n, m, k = qw.shape[0], qx.shape[0], qx.shape[1]
    if qw.scheme == "q8_0":
        qwt = qw.codes.to(torch.float64)
    else:
        qwt = unpack_nibbles(qw.codes).to(torch.float64)
        if qw.scheme == "q4_0":
            qwt = qwt - 8
    blocks = k // BLOCK
    # integer dot per (row of x, row of W, 32-block): exact in float64
    dots = torch.einsum("mbk,nbk->mnb", qx.to(torch.float64).reshape(m, blocks, BLOCK),
                        qwt.reshape(n, blocks, BLOCK)).to(torch.float32)
    per_group = qw.group_size // BLOCK
    dw = qw.scales.float().repeat_interleave(per_group, dim=1)  # (n, blocks)
    y = (dots * dw.unsqueeze(0) * dx.unsqueeze(1)).sum(-1)
    if qw.scheme == "q4_1":
        sums = qx.to(torch.float32).reshape(m, blocks, BLOCK).sum(-1) * dx  # (m, blocks)
        y = y + sums @ qw.mins.float().repeat_interleave(per_group, dim=1).T
    return y


def from_gguf_blocks(data: bytes | np.ndarray | torch.Tensor, ggml_type: str,
                     shape: tuple[int, int]) -> QuantizedWeight:
    """A GGUF Q8_0 / Q4_0 / Q4_1 tensor's raw blocks -> QuantizedWeight at group 32, by
    copying bytes (scales stay the file's fp16 bits, codes its bytes): no float round trip.

    `shape` is (out_features, in_features), torch order (GGUF lists it reversed).
    Q6_K / Q4_K have no such mapping: dequantize them with gguf and `quantize` to q8_0.
    """
    if ggml_type not in _GGUF_BLOCKS:
        raise SLMError(f"GGUF type {ggml_type} cannot be kept quantized; dequantize it and "
                       f"requantize to q8_0 (supported as-is: {', '.join(_GGUF_BLOCKS)})")
    scheme, block_bytes, header = _GGUF_BLOCKS[ggml_type]
    rows, cols = shape
    if cols % BLOCK:
        raise SLMError(f"GGUF tensor of shape {shape} has rows not made of {BLOCK}-weight blocks; the file is corrupt")
    # sliced in numpy, so a read-only memory map (GGUFReader's) is only read: each field is
    # copied once into its own contiguous array
    raw = data.numpy() if isinstance(data, torch.Tensor) else np.frombuffer(data, dtype=np.uint8) \
        if isinstance(data, bytes) else np.asarray(data, dtype=np.uint8)
    expected = rows * cols // BLOCK * block_bytes
    if raw.size != expected:
        raise SLMError(f"GGUF {ggml_type} tensor of shape {shape} needs {expected} bytes, got "
                       f"{raw.size}; the file is corrupt or the shape is wrong")
    blocks = raw.reshape(rows, cols // BLOCK, block_bytes)

    def field(start: int, stop: int, dtype: np.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(blocks[:, :, start:stop]).view(dtype).reshape(rows, -1))

    scales = field(0, 2, np.float16)
    mins = field(2, 4, np.float16) if header == 2 else torch.empty(0, dtype=torch.float16)
    codes = field(2 * header, block_bytes, np.int8 if scheme == "q8_0" else np.uint8)
    return QuantizedWeight(scheme, codes, scales, mins, (rows, cols), BLOCK)
