"""Quantized-weight matmul on CPU: a small C kernel, built on first use, beside the
pure-PyTorch reference in `quant.py`.

Why a kernel: at batch 1 a linear layer is a GEMV whose cost is reading the weight, and
PyTorch's own weight-only CPU ops are slower than float32 there (576x1536: fp32 60 us,
`_weight_int8pack_mm` 509, `_weight_int4pack_mm_for_cpu` 853; see
benchmarks/bench_quant_kernels.py). The kernel does what llama.cpp's vec_dot does: the
activations are quantized to int8 per 32-block on the fly (llama.cpp's Q8_0), each
block's dot product with the weight codes is one exact int32 VNNI `dpbusd` (4-bit codes
are unsigned 0..15, so q4_0's -8 and q4_1's min become one per-block correction from
the activation block's sum), then scaled in float. OpenMP threads split the output rows.
Its numerics are `reference_matmul(x, w, quantized_activations=True)` (equal up to float
summation order). bf16/fp16 weights are widened to float32 in registers (exact).

Batches above SMALL_BATCH rows (prefill, lm-eval) instead dequantize the weight to
float32 in C (bit-identical to `quant.dequantize`) and call `torch.mm`: there the matmul is
compute-bound and oneDNN's GEMM wins; the numerics are then `quantized_activations=False`.

Without a compiler, on another device, or with `SLM_QUANT_NATIVE=0`, the float reference
(`x @ dequantize(W)^T`) runs instead. The op is registered with torch (see `_LIBRARY`) with
a fake impl, so `torch.compile` keeps it as one opaque call; eager calls skip the
dispatcher (its Python overhead is paid ~200 times per decoded token).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterator
from typing import Any

import torch

from simplified_slm.ops.native_build import load_library
from simplified_slm.ops.quant import BLOCK, QuantizedWeight, reference_grad_input, reference_matmul, row_slices

SMALL_BATCH = 16  # rows of x up to which the int8 GEMV runs; above, dequantize + torch.mm
_SCHEME_ID = {"q8_0": 0, "q4_0": 1, "q4_1": 2, "bf16": 3, "fp16": 4}

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__AVX2__) || defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX2__)
#define QK_VNNI 1
#endif
#if defined(QK_VNNI) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__F16C__)
#define QK_VNNI512 1 /* two 32-blocks per 512-bit step */
#endif

#define BLOCK 32
enum { Q8_0 = 0, Q4_0 = 1, Q4_1 = 2, BF16 = 3, FP16 = 4 };

static inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
    if (exp == 0) {
        float f = ldexpf((float)mant, -24);
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    }
    float out;
    memcpy(&out, &bits, 4);
    return out;
#endif
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float out;
    memcpy(&out, &bits, 4);
    return out;
}

/* One row of activations -> int8 codes, block scales d, and d * sum(codes) per block
   (llama.cpp's Q8_0 rounding: d = max|x| / 127, codes rounded half away from zero). */
static void quantize_row(const float *x, int64_t k, int8_t *q, float *d, float *dsum) {
    for (int64_t b = 0; b < k / BLOCK; ++b) {
        const float *xb = x + b * BLOCK;
        float amax = 0.0f;
        for (int i = 0; i < BLOCK; ++i) amax = fmaxf(amax, fabsf(xb[i]));
        float scale = amax / 127.0f, inv = scale != 0.0f ? 1.0f / scale : 0.0f;
        int sum = 0;
        for (int i = 0; i < BLOCK; ++i) {
            int v = (int)roundf(xb[i] * inv);
            q[b * BLOCK + i] = (int8_t)v;
            sum += v;
        }
        d[b] = scale;
        dsum[b] = scale * (float)sum;
    }
}


/* s[b] = d_w(b) * d_x(b): one float scale per 32-block of this row and activation row */
static void block_scales(const uint16_t *sw, const float *dx, int64_t blocks, int64_t per_group, float *s) {
    int64_t b = 0;
#ifdef QK_VNNI512
    if (per_group == 1)
        for (; b + 16 <= blocks; b += 16)
            _mm512_storeu_ps(s + b, _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sw + b))),
                                                  _mm512_loadu_ps(dx + b)));
#endif
    for (; b < blocks; ++b) s[b] = half_to_float(sw[b / per_group]) * dx[b];
}

/* 4-bit offsets: sum_b c_b * d_x(b) * sum(x_q in b), c = m (q4_1) or -8 d (q4_0) */
static float block_offsets(const uint16_t *sw, const uint16_t *mw, const float *dxs, int64_t blocks, int64_t per_group) {
    int64_t b = 0;
    float acc = 0.0f;
#ifdef QK_VNNI512
    if (per_group == 1) {
        __m512 v = _mm512_setzero_ps();
        for (; b + 16 <= blocks; b += 16) {
            __m512 c = mw ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mw + b)))
                          : _mm512_mul_ps(_mm512_set1_ps(-8.0f), _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sw + b))));
            v = _mm512_fmadd_ps(c, _mm512_loadu_ps(dxs + b), v);
        }
        acc = _mm512_reduce_add_ps(v);
    }
#endif
    for (; b < blocks; ++b)
        acc += (mw ? half_to_float(mw[b / per_group]) : -8.0f * half_to_float(sw[b / per_group])) * dxs[b];
    return acc;
}

#ifdef QK_VNNI512
/* [s(b) x 8 | s(b + 1) x 8]: the scales of the two blocks one 512-bit dot covers */
#define PAIR_SCALES(s, b) _mm512_insertf32x8(_mm512_set1_ps((s)[b]), _mm256_set1_ps((s)[(b) + 1]), 1)

static inline __m512i pair_dot_q8(const int8_t *w, const int8_t *xq) {
    __m512i wv = _mm512_loadu_si512(w), xv = _mm512_loadu_si512(xq);
    /* dpbusd multiplies unsigned by signed: |w| times x with w's sign */
    __m512i sx = _mm512_mask_sub_epi8(xv, _mm512_movepi8_mask(wv), _mm512_setzero_si512(), xv);
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(wv), sx);
}

static inline __m512i pair_dot_q4(const uint8_t *w, const int8_t *xq) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256i bytes = _mm256_loadu_si256((const __m256i *)w);  /* 16 bytes of block b, 16 of b + 1 */
    __m512i codes = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(bytes, low)),
                                       _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low), 1);
    /* lanes [b lo, b+1 lo, b hi, b+1 hi] -> [b lo, b hi, b+1 lo, b+1 hi]: weights 0..63 in order */
    codes = _mm512_shuffle_i64x2(codes, codes, _MM_SHUFFLE(3, 1, 2, 0));
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, _mm512_loadu_si512(xq));
}
#endif

#ifdef QK_VNNI
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* sum_b s_b * dot(w codes of block b, x codes of block b); q4 codes are unsigned 0..15 */
static float dot_blocks(int scheme, const void *w, const int8_t *xq, const float *s, int64_t blocks) {
    int64_t b = 0;
    float acc = 0.0f;
    const int8_t *w8 = (const int8_t *)w;
    const uint8_t *w4 = (const uint8_t *)w;
#ifdef QK_VNNI512
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();  /* two chains of FMAs */
    if (scheme == Q8_0) {
        for (; b + 4 <= blocks; b += 4) {
            acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(pair_dot_q8(w8 + b * BLOCK, xq + b * BLOCK)), PAIR_SCALES(s, b), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(pair_dot_q8(w8 + (b + 2) * BLOCK, xq + (b + 2) * BLOCK)),
                                   PAIR_SCALES(s, b + 2), acc1);
        }
    } else {
        for (; b + 4 <= blocks; b += 4) {
            acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(pair_dot_q4(w4 + b * BLOCK / 2, xq + b * BLOCK)), PAIR_SCALES(s, b), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(pair_dot_q4(w4 + (b + 2) * BLOCK / 2, xq + (b + 2) * BLOCK)),
                                   PAIR_SCALES(s, b + 2), acc1);
        }
    }
    acc = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#endif
#ifdef QK_VNNI
    __m256 tail = _mm256_setzero_ps();
    const __m128i low = _mm_set1_epi8(0x0F);
    for (; b < blocks; ++b) {
        __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + b * BLOCK)), dot;
        if (scheme == Q8_0) {
            __m256i wv = _mm256_loadu_si256((const __m256i *)(w8 + b * BLOCK));
            dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
        } else {
            __m128i bytes = _mm_loadu_si128((const __m128i *)(w4 + b * BLOCK / 2));
            __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), low), _mm_and_si128(bytes, low));
            dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), codes, xv);
        }
        tail = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(s[b]), tail);
    }
    acc += hsum8(tail);
#else
    for (; b < blocks; ++b) {
        const int8_t *xb = xq + b * BLOCK;
        int32_t dot = 0;
        if (scheme == Q8_0) {
            for (int i = 0; i < BLOCK; ++i) dot += (int32_t)w8[b * BLOCK + i] * xb[i];
        } else {
            const uint8_t *wb = w4 + b * BLOCK / 2;
            for (int i = 0; i < BLOCK / 2; ++i) dot += (wb[i] & 0x0F) * xb[i] + (wb[i] >> 4) * xb[i + BLOCK / 2];
        }
        acc += (float)dot * s[b];
    }
#endif
    return acc;
}

static float dot_half(int scheme, const uint16_t *w, const float *x, int64_t k) {
    int64_t i = 0;
    float acc = 0.0f;
#if defined(__AVX512F__)
    __m512 v = _mm512_setzero_ps();
    for (; i + 16 <= k; i += 16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(w + i));
        __m512 wf = scheme == BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                                   : _mm512_cvtph_ps(h);
        v = _mm512_fmadd_ps(wf, _mm512_loadu_ps(x + i), v);
    }
    acc = _mm512_reduce_add_ps(v);
#endif
    for (; i < k; ++i) acc += (scheme == BF16 ? bf16_to_float(w[i]) : half_to_float(w[i])) * x[i];
    return acc;
}

static int team(int64_t n, int64_t k, int threads) {
    /* waking a second thread costs a few microseconds: not worth it for a tiny matrix */
    return n * k < 32768 ? 1 : threads;
}

/* y (m, n) = x (m, k) @ W^T for W (n, k) in `scheme`; m is small (decode, short prompts). */
int quant_gemv(int scheme, const void *codes, const uint16_t *scales, const uint16_t *mins,
               const float *x, float *y, int64_t m, int64_t n, int64_t k, int64_t group, int threads) {
    int64_t blocks = k / BLOCK, per_group = group / BLOCK;
    int use = team(n, k, threads);
    if (scheme == BF16 || scheme == FP16) {
        #pragma omp parallel for num_threads(use) if(use > 1) schedule(static)
        for (int64_t r = 0; r < n; ++r)
            for (int64_t i = 0; i < m; ++i)
                y[i * n + r] = dot_half(scheme, (const uint16_t *)codes + r * k, x + i * k, k);
        return 0;
    }
    int8_t *xq = malloc((size_t)(m * k));
    float *dx = malloc(sizeof(float) * (size_t)(2 * m * blocks));
    if (!xq || !dx) { free(xq); free(dx); return 1; }
    float *dxs = dx + m * blocks;
    for (int64_t i = 0; i < m; ++i) quantize_row(x + i * k, k, xq + i * k, dx + i * blocks, dxs + i * blocks);
    #pragma omp parallel for num_threads(use) if(use > 1) schedule(static)
    for (int64_t r = 0; r < n; ++r) {
        const uint16_t *sw = scales + r * (k / group);
        const uint16_t *mw = scheme == Q4_1 ? mins + r * (k / group) : 0;
        const void *wr = scheme == Q8_0 ? (const void *)((const int8_t *)codes + r * k)
                                        : (const void *)((const uint8_t *)codes + r * k / 2);
        float s[blocks];
        for (int64_t i = 0; i < m; ++i) {
            block_scales(sw, dx + i * blocks, blocks, per_group, s);
            float y_ri = dot_blocks(scheme, wr, xq + i * k, s, blocks);
            if (scheme != Q8_0) y_ri += block_offsets(sw, mw, dxs + i * blocks, blocks, per_group);
            y[i * n + r] = y_ri;
        }
    }
    free(xq);
    free(dx);
    return 0;
}

/* W (n, k) float32 from its packed form: d * q (+ m), as quant.dequantize computes it. */
void quant_dequantize(int scheme, const void *codes, const uint16_t *scales, const uint16_t *mins,
                      float *w, int64_t n, int64_t k, int64_t group, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; ++r) {
        float *wr = w + r * k;
        if (scheme == BF16 || scheme == FP16) {
            const uint16_t *h = (const uint16_t *)codes + r * k;
            for (int64_t j = 0; j < k; ++j) wr[j] = scheme == BF16 ? bf16_to_float(h[j]) : half_to_float(h[j]);
            continue;
        }
        for (int64_t j = 0; j < k; ++j) {
            int64_t g = r * (k / group) + j / group;
            float d = half_to_float(scales[g]), q;
            if (scheme == Q8_0) {
                q = (float)((const int8_t *)codes)[r * k + j];
            } else {
                int64_t b = j / BLOCK, i = j % BLOCK;
                uint8_t byte = ((const uint8_t *)codes)[r * k / 2 + b * BLOCK / 2 + i % (BLOCK / 2)];
                q = (float)(i < BLOCK / 2 ? byte & 0x0F : byte >> 4);
                if (scheme == Q4_0) q -= 8.0f;
            }
            wr[j] = scheme == Q4_1 ? d * q + half_to_float(mins[g]) : d * q;
        }
    }
}
"""

_BASE_FLAGS = ["-O3", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off"]
# Tried in order: the host's vector units with OpenMP, then portable builds.
_FLAG_SETS = [[*_BASE_FLAGS, "-march=native", "-fopenmp"], [*_BASE_FLAGS, "-fopenmp"], _BASE_FLAGS]


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The built kernel library, or None when it cannot be had here (then PyTorch runs)."""
    lib = load_library("quant", _SOURCE, _FLAG_SETS, "SLM_QUANT_NATIVE")
    if lib is None:
        return None
    ptr, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.quant_gemv.argtypes = [c_int] + [ptr] * 5 + [i64] * 4 + [c_int]
    lib.quant_gemv.restype = c_int
    lib.quant_dequantize.argtypes = [c_int] + [ptr] * 4 + [i64] * 3 + [c_int]
    lib.quant_dequantize.restype = None
    return lib


@torch.compiler.assume_constant_result
def _built() -> bool:
    """Whether the library is here; a constant for torch.compile, which cannot trace a build."""
    return _library() is not None


def native_available(x: torch.Tensor) -> bool:
    """True when the C kernel can run on `x` (a CPU float tensor and a built library)."""
    return x.device.type == "cpu" and x.is_floating_point() and _built()


def _dequantize_native(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, scheme: str,
                       group_size: int, in_features: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """W as float32 (into `out`, a contiguous (rows, in_features) buffer, when given)."""
    w = torch.empty(codes.shape[0], in_features, dtype=torch.float32) if out is None else out
    _library().quant_dequantize(_SCHEME_ID[scheme], codes.data_ptr(), scales.data_ptr(), mins.data_ptr(),
                                w.data_ptr(), codes.shape[0], in_features, group_size or BLOCK,
                                torch.get_num_threads())
    return w


# Bytes of float32 weight rows dequantized at a time for large batches: a slice big enough
# for an efficient GEMM, small enough that prefill never holds W in float32 (a 1B model's
# 128256 x 2048 head would be 1 GB).
_DEQUANTIZED_SLICE_BYTES = 16 << 20


def _weight_slices(qw: QuantizedWeight) -> Iterator[tuple[slice, torch.Tensor]]:
    """W in float32, 16 MB of rows at a time, each slice dequantized in C into one reused
    buffer: (the rows it covers, the slice)."""
    n, k = qw.shape
    rows = min(n, max(1, _DEQUANTIZED_SLICE_BYTES // (4 * k)))
    buffer, start = torch.empty(rows, k), 0
    for part in row_slices(qw, rows):
        stop = start + part.shape[0]
        yield slice(start, stop), _dequantize_native(part.codes, part.scales, part.mins, qw.scheme, qw.group_size,
                                                     k, out=buffer[:part.shape[0]])
        start = stop


def _dequantized_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                        scheme: str, group_size: int) -> torch.Tensor:
    """x @ W^T for many rows of x: each slice of W multiplied by oneDNN's GEMM straight into
    its columns of y."""
    (m, k), n = x.shape, codes.shape[0]
    y = x.new_empty(m, n)
    for rows, w in _weight_slices(QuantizedWeight(scheme, codes, scales, mins, (n, k), group_size)):
        torch.mm(x, w.T, out=y[:, rows])
    return y


def _dequantized_grad_input(g: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """g @ W (the gradient of x @ W^T for x), summed over the same slices of W."""
    gx = g.new_zeros(g.shape[0], qw.shape[1])
    for rows, w in _weight_slices(qw):
        gx.addmm_(g[:, rows], w)
    return gx


class _FrozenWeightMatmul(torch.autograd.Function):
    """x @ W^T differentiable in x only (W is frozen: the base under LoRA adapters), in the
    float numerics (x @ dequantize(W)^T) both ways. The backward dequantizes W again a
    slice at a time, so autograd keeps the packed W alive, never a float32 copy of it
    (which would cost a QLoRA run the memory it quantized to save)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                scheme: str, group_size: int) -> torch.Tensor:
        ctx.save_for_backward(codes, scales, mins)
        ctx.scheme, ctx.group_size, ctx.k = scheme, group_size, x.shape[1]
        if native_available(x):
            return _dequantized_matmul(x, codes, scales, mins, scheme, group_size)
        qw = QuantizedWeight(scheme, codes, scales, mins, (codes.shape[0], x.shape[1]), group_size)
        return reference_matmul(x, qw, quantized_activations=False)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        codes, scales, mins = ctx.saved_tensors
        qw = QuantizedWeight(ctx.scheme, codes, scales, mins, (codes.shape[0], ctx.k), ctx.group_size)
        g = g.contiguous()
        gx = _dequantized_grad_input(g, qw) if native_available(g) else reference_grad_input(g, qw)
        return gx, None, None, None, None, None


def _matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
            scheme: str, group_size: int) -> torch.Tensor:
    """y = x @ W^T for contiguous float32 x (M, K) and W's packed tensors."""
    m, k = x.shape
    if m > SMALL_BATCH:
        return _dequantized_matmul(x, codes, scales, mins, scheme, group_size)
    y = x.new_empty(m, codes.shape[0])
    failed = _library().quant_gemv(_SCHEME_ID[scheme], codes.data_ptr(), scales.data_ptr(), mins.data_ptr(),
                                   x.data_ptr(), y.data_ptr(), m, codes.shape[0], k, group_size or BLOCK,
                                   torch.get_num_threads())
    if failed:
        raise MemoryError(f"quant_gemv could not allocate {m * k} bytes of activation codes")
    return y


# Registered as a torch op with a fake (shape) impl, so torch.compile keeps it in its graph
# as one opaque call. Through the low-level `torch.library.Library` rather than
# `torch.library.custom_op`: a compiled decode step calls it ~200 times per token, and
# custom_op's Python wrapper layers cost about twice the dispatch overhead (measured with
# the benchmark's shapes). No autograd here: `_FrozenWeightMatmul` serves gradients.
_LIBRARY = torch.library.Library("simplified_slm", "FRAGMENT")
_LIBRARY.define("quant_matmul(Tensor x, Tensor codes, Tensor scales, Tensor mins, str scheme, int group_size) -> Tensor")
_LIBRARY.impl("quant_matmul", _matmul, "CPU")


@torch.library.register_fake("simplified_slm::quant_matmul")
def _matmul_shape(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                  scheme: str, group_size: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], codes.shape[0])


def quantized_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                     scheme: str, group_size: int) -> torch.Tensor:
    """x (..., K) @ W^T for a packed W (see `quant.QuantizedWeight`), in x's dtype: the C
    kernel where it is built, else the float reference. When a gradient must flow back to x
    (adapters trained over a quantized base) the float numerics run, with a backward that
    never holds W in float32 (`_FrozenWeightMatmul`)."""
    lead, k = x.shape[:-1], x.shape[-1]
    if x.requires_grad and torch.is_grad_enabled():
        y = _FrozenWeightMatmul.apply(x.reshape(-1, k).to(torch.float32).contiguous(), codes, scales, mins, scheme,
                                      group_size)
        return y.view(*lead, codes.shape[0]).to(x.dtype)
    if not native_available(x):
        qw = QuantizedWeight(scheme, codes, scales, mins, (codes.shape[0], k), group_size)
        return reference_matmul(x, qw, quantized_activations=False)
    x2 = x.reshape(-1, k)
    if x.dtype is not torch.float32:  # each skipped no-op call saves a dispatch (~3 us, x 210 per token)
        x2 = x2.to(torch.float32)
    op = torch.ops.simplified_slm.quant_matmul.default if torch.compiler.is_compiling() else _matmul
    y = op(x2.contiguous(), codes, scales, mins, scheme, group_size).view(*lead, codes.shape[0])
    return y if x.dtype is torch.float32 else y.to(x.dtype)
