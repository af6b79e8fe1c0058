"""Quantized-weight matmul on CPU: a small C kernel, built on first use, beside the
pure-PyTorch reference in `quant.py`.

Why a kernel: at batch 1 a linear layer is a GEMV whose cost is reading the weight, and
PyTorch's own weight-only CPU ops are slower than float32 there (576x1536: fp32 60 us,
`_weight_int8pack_mm` 509, `_weight_int4pack_mm_for_cpu` 853; see
benchmarks/bench_quant_kernels.py). The kernel does what llama.cpp's vec_dot does: the
activations are quantized to int8 per 32-block on the fly (llama.cpp's Q8_0), each
block's dot product with the weight codes is exact int32 VNNI `dpbusd` (4-bit codes are
unsigned 0..15 and q8_0's are biased by +128, so q4_0's -8, q4_1's min and the bias become
one per-block correction from the activation block's sum), then scaled in float. Four
blocks per 512-bit step: the activation codes are stored in the order the 4-bit weights
unpack, so the per-row work is a load, a nibble split, two `dpbusd` and one FMA per 128
weights; the per-row scale vector is permuted, not rebuilt, per step. Each weight row is
unpacked once for up to 4 activation rows (prompts). OpenMP threads split the output rows.
Its numerics are `reference_matmul(x, w, quantized_activations=True)` (equal up to float
summation order). bf16/fp16 weights are widened to float32 in registers (exact).

Batches above SMALL_BATCH rows (long prefill, lm-eval) instead dequantize the weight to
float32 in C (bit-identical to `quant.dequantize`) and call `torch.mm`; the numerics are then
`quantized_activations=False`. The int8 kernel wins up to well past 64 rows at SmolLM2's
shapes (64 rows of the 49152x576 head: 26 ms against 67 ms), so prompts of chat length
take it, as llama.cpp does for every batch; large evaluation batches keep the float path.

Without a compiler, on another device, or with `SLM_QUANT_NATIVE=0`, the float reference
(`x @ dequantize(W)^T`) runs instead. Both paths are torch ops with fake impls (see
`_LIBRARY`), so `torch.compile` keeps each as one opaque call. The GEMV op is implemented
in C++ (`_OPS_SOURCE`), which calls the kernel straight from the dispatcher: ~2 us a call
against ~6 us through a Python impl and ctypes, paid ~210 times per decoded token (+13%
compiled decode tok/s). Without a C++ compiler the Python impl serves it.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterator
from typing import Any

import torch

from simplified_slm.ops.native_build import load_library, load_torch_ops
from simplified_slm.ops.quant import BLOCK, QuantizedWeight, reference_grad_input, reference_matmul, row_slices

SMALL_BATCH = 64  # rows of x up to which the int8 GEMV runs; above, dequantize + torch.mm
_SCHEME_ID = {"q8_0": 0, "q4_0": 1, "q4_1": 2, "bf16": 3, "fp16": 4}

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__AVX2__) || defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__) && defined(__AVX512DQ__) \
    && defined(__F16C__)
#define QK_VNNI512 1 /* four 32-blocks per 512-bit step; elsewhere the scalar dot products */
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

/* Activation side of the int8 product, per row of x: int8 codes, and per 32-block the
   scale d and the offset coefficient c (the weight scheme's zero point times d * sum(codes):
   q4_1's mins multiply d * sum, q4_0's -8 d_w becomes -8 d * sum, and q8_0's codes enter
   the unsigned-by-signed dot biased by +128, so -128 d * sum). Block arrays are padded with
   zeros to whole chunks of 16 blocks, so every vector loop runs on full vectors: a zero
   activation block cancels whatever weight bytes meet it. */
#define CHUNK 16 /* blocks per 512-bit vector of float scales */

static inline int64_t padded_blocks(int64_t blocks) { return (blocks + CHUNK - 1) / CHUNK * CHUNK; }

static float zero_point(int scheme) { return scheme == Q4_0 ? -8.0f : scheme == Q8_0 ? -128.0f : 1.0f; }

/* llama.cpp's Q8_0 for activations: d = max|x| / 127, codes rounded half away from zero
   (as sign(v) floor(|v| + 0.5), which `quant.quantize_activations` computes too). On the
   AVX-512 VNNI path, for 4-bit weights, the codes of each 4 blocks are stored in the order
   those weights unpack (see quad_step): [lows of blocks 0-3 | highs of blocks 0-3], 16 each. */
static void quantize_activations(int scheme, const float *x, int64_t k, int8_t *q, float *d, float *c) {
    int64_t blocks = k / BLOCK;
    float zp = zero_point(scheme);
    for (int64_t b = 0; b < blocks; ++b) {
        const float *xb = x + b * BLOCK;
        int8_t codes[BLOCK];
        int sum = 0;
#ifdef QK_VNNI512
        __m512 lo = _mm512_loadu_ps(xb), hi = _mm512_loadu_ps(xb + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        float scale = amax / 127.0f, inv = scale != 0.0f ? 1.0f / scale : 0.0f;
        __m512 vinv = _mm512_set1_ps(inv), half = _mm512_set1_ps(0.5f);
        for (int h = 0; h < 2; ++h) {
            __m512 v = _mm512_mul_ps(h ? hi : lo, vinv);
            __m512 r = _mm512_roundscale_ps(_mm512_add_ps(_mm512_abs_ps(v), half), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
            __m512i qi = _mm512_cvttps_epi32(_mm512_or_ps(r, _mm512_and_ps(v, _mm512_set1_ps(-0.0f))));
            sum += _mm512_reduce_add_epi32(qi);
            _mm_storeu_si128((__m128i *)(codes + 16 * h), _mm512_cvtsepi32_epi8(qi));
        }
#else
        float amax = 0.0f;
        for (int i = 0; i < BLOCK; ++i) amax = fmaxf(amax, fabsf(xb[i]));
        float scale = amax / 127.0f, inv = scale != 0.0f ? 1.0f / scale : 0.0f;
        for (int i = 0; i < BLOCK; ++i) {
            float v = xb[i] * inv, r = floorf(fabsf(v) + 0.5f);
            codes[i] = (int8_t)(v < 0.0f ? -r : r);
            sum += codes[i];
        }
#endif
#ifdef QK_VNNI512
        if (scheme != Q8_0) {
            int8_t *quad = q + (b / 4) * 4 * BLOCK + (b % 4) * (BLOCK / 2);
            memcpy(quad, codes, BLOCK / 2);
            memcpy(quad + 2 * BLOCK, codes + BLOCK / 2, BLOCK / 2);
        } else
#endif
            memcpy(q + b * BLOCK, codes, BLOCK);
        d[b] = scale;
        c[b] = zp * scale * (float)sum;
    }
}

/* The float32 weight scales (and q4_1 mins) of up to 16 blocks from `first`; zeros past `blocks`. */
static void block_params(const uint16_t *h, int64_t first, int64_t blocks, int64_t per_group, float *out) {
    for (int j = 0; j < CHUNK; ++j)
        out[j] = first + j < blocks ? half_to_float(h[(first + j) / per_group]) : 0.0f;
}

#ifdef QK_VNNI512
static inline __m512 chunk_params(const uint16_t *h, int64_t first, int64_t blocks, int64_t per_group) {
    int64_t n = blocks - first < CHUNK ? blocks - first : CHUNK;
    if (per_group == 1)
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), h + first));
    float f[CHUNK];
    block_params(h, first, blocks, per_group, f);
    return _mm512_loadu_ps(f);
}

static inline __mmask64 byte_mask(int64_t n) { return n >= 64 ? ~(__mmask64)0 : n <= 0 ? 0 : (((__mmask64)1 << n) - 1); }

/* One weight row against up to TILE activation rows (x row i at offset i * padded blocks):
   out[i] = sum_b d_w d_x dot(codes) + sum_b c_w c_x. Four 32-blocks per step. 4-bit: their
   64 code bytes split into low and high nibbles, two dpbusd against the activation codes
   stored in the same order, so int32 lane j holds block j / 4's partial dot; q8_0: two
   64-byte halves biased to unsigned (xor 0x80), lanes j / 8. Each step's partial dots are
   scaled by a lane permutation of the chunk's 16 scales. The weight bytes are loaded and
   unpacked once for all the tile's rows (a short prompt's rows share them). */
#define TILE 4
/* Blocks first + step .. + 3 (of which `left` remain in the chunk) for `rows` activation rows. */
static inline __attribute__((always_inline)) void quad_step(
        int scheme, const uint8_t *w, const int8_t *xq, int64_t first, int64_t step, int64_t left, int64_t padded,
        const int rows, const __m512 *s, __m512 *acc, __m512 *acc1) {
    const __m512i step_lanes = _mm512_set1_epi32((int32_t)step);
    int64_t b = first + step;
    if (scheme == Q8_0) {
        const __m512i bias = _mm512_set1_epi8((char)0x80);
        const __m512i pair_lanes = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        const uint8_t *wb = w + b * BLOCK;
        __m512i w0 = _mm512_xor_si512(_mm512_maskz_loadu_epi8(byte_mask(left * BLOCK), wb), bias);
        __m512i w1 = _mm512_xor_si512(_mm512_maskz_loadu_epi8(byte_mask(left * BLOCK - 64), wb + 64), bias);
        __m512i p0 = _mm512_add_epi32(pair_lanes, step_lanes), p1 = _mm512_add_epi32(p0, _mm512_set1_epi32(2));
        _Pragma("GCC unroll 4") for (int i = 0; i < rows; ++i) {
            const int8_t *xi = xq + i * padded * BLOCK + b * BLOCK;
            __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512(xi));
            __m512i d1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w1, _mm512_loadu_si512(xi + 64));
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_permutexvar_ps(p0, s[i]), acc[i]);
            acc1[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_permutexvar_ps(p1, s[i]), acc1[i]);
        }
    } else {
        const __m512i low = _mm512_set1_epi8(0x0F);
        const __m512i quad_lanes = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
        __m512i bytes = _mm512_maskz_loadu_epi8(byte_mask(left * BLOCK / 2), w + b * BLOCK / 2);
        __m512i lo = _mm512_and_si512(bytes, low), hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low);
        __m512i pq = _mm512_add_epi32(quad_lanes, step_lanes);
        _Pragma("GCC unroll 4") for (int i = 0; i < rows; ++i) {
            const int8_t *xi = xq + i * padded * BLOCK + b * BLOCK;
            __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xi)),
                                              hi, _mm512_loadu_si512(xi + 64));
            __m512 f = _mm512_cvtepi32_ps(dot), sq = _mm512_permutexvar_ps(pq, s[i]);
            if (step & 4) acc1[i] = _mm512_fmadd_ps(f, sq, acc1[i]);  /* two FMA chains */
            else acc[i] = _mm512_fmadd_ps(f, sq, acc[i]);
        }
    }
}

static inline __attribute__((always_inline)) void dot_tile(
        int scheme, const uint8_t *w, const uint16_t *sw, const uint16_t *mw, const int8_t *xq, const float *dx,
        const float *cx, int64_t padded, int64_t blocks, int64_t per_group, const int rows, float *out) {
    __m512 acc[TILE], acc1[TILE], s[TILE];
    _Pragma("GCC unroll 4") for (int i = 0; i < rows; ++i) acc[i] = acc1[i] = _mm512_setzero_ps();
    for (int64_t first = 0; first < blocks; first += CHUNK) {
        __m512 dw = chunk_params(sw, first, blocks, per_group);
        __m512 coef = mw ? chunk_params(mw, first, blocks, per_group) : dw;
        _Pragma("GCC unroll 4") for (int i = 0; i < rows; ++i) {
            s[i] = _mm512_mul_ps(dw, _mm512_loadu_ps(dx + i * padded + first));
            acc1[i] = _mm512_fmadd_ps(coef, _mm512_loadu_ps(cx + i * padded + first), acc1[i]);
        }
        int64_t left = blocks - first;
        if (left >= CHUNK) {  /* a whole chunk: four steps with constant lane indices and masks */
            quad_step(scheme, w, xq, first, 0, CHUNK, padded, rows, s, acc, acc1);
            quad_step(scheme, w, xq, first, 4, CHUNK - 4, padded, rows, s, acc, acc1);
            quad_step(scheme, w, xq, first, 8, CHUNK - 8, padded, rows, s, acc, acc1);
            quad_step(scheme, w, xq, first, 12, CHUNK - 12, padded, rows, s, acc, acc1);
        } else {
            for (int64_t step = 0; step < left; step += 4)
                quad_step(scheme, w, xq, first, step, left - step, padded, rows, s, acc, acc1);
        }
    }
    _Pragma("GCC unroll 4") for (int i = 0; i < rows; ++i) out[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i], acc1[i]));
}

/* One weight row against all m activation rows, TILE at a time: y[i * n] for each i. */
static void dot_rows(int scheme, const uint8_t *w, const uint16_t *sw, const uint16_t *mw, const int8_t *xq,
                     const float *dx, const float *cx, int64_t padded, int64_t blocks, int64_t per_group, int64_t m,
                     float *y, int64_t n) {
    float out[TILE];
    if (m == 1) {  /* decode: its own copy, laid out for the one row */
        dot_tile(scheme, w, sw, mw, xq, dx, cx, padded, blocks, per_group, 1, out);
        y[0] = out[0];
        return;
    }
    for (int64_t i = 0; i < m; i += TILE) {
        const int8_t *xi = xq + i * padded * BLOCK;
        const float *dxi = dx + i * padded, *cxi = cx + i * padded;
        int rows = m - i < TILE ? (int)(m - i) : TILE;
        switch (rows) {  /* each case a specialised copy, its accumulators in registers */
            case 1: dot_tile(scheme, w, sw, mw, xi, dxi, cxi, padded, blocks, per_group, 1, out); break;
            case 2: dot_tile(scheme, w, sw, mw, xi, dxi, cxi, padded, blocks, per_group, 2, out); break;
            case 3: dot_tile(scheme, w, sw, mw, xi, dxi, cxi, padded, blocks, per_group, 3, out); break;
            default: dot_tile(scheme, w, sw, mw, xi, dxi, cxi, padded, blocks, per_group, TILE, out); break;
        }
        for (int t = 0; t < rows; ++t) y[(i + t) * n] = out[t];
    }
}
#else
static float dot_row(int scheme, const uint8_t *w, const uint16_t *sw, const uint16_t *mw, const int8_t *xq,
                     const float *dx, const float *cx, int64_t blocks, int64_t per_group) {
    float acc = 0.0f, params[CHUNK], mins[CHUNK];
    for (int64_t first = 0; first < blocks; first += CHUNK) {
        block_params(sw, first, blocks, per_group, params);
        if (mw) block_params(mw, first, blocks, per_group, mins);
        for (int64_t b = first; b < blocks && b < first + CHUNK; ++b) {
            const int8_t *xb = xq + b * BLOCK;
            int32_t dot = 0;
            if (scheme == Q8_0) {
                for (int i = 0; i < BLOCK; ++i) dot += ((int32_t)((const int8_t *)w)[b * BLOCK + i] + 128) * xb[i];
            } else {
                const uint8_t *wb = w + b * BLOCK / 2;
                for (int i = 0; i < BLOCK / 2; ++i) dot += (wb[i] & 0x0F) * xb[i] + (wb[i] >> 4) * xb[i + BLOCK / 2];
            }
            float p = params[b - first];
            acc += (float)dot * p * dx[b] + (mw ? mins[b - first] : p) * cx[b];
        }
    }
    return acc;
}

static void dot_rows(int scheme, const uint8_t *w, const uint16_t *sw, const uint16_t *mw, const int8_t *xq,
                     const float *dx, const float *cx, int64_t padded, int64_t blocks, int64_t per_group, int64_t m,
                     float *y, int64_t n) {
    for (int64_t i = 0; i < m; ++i)
        y[i * n] = dot_row(scheme, w, sw, mw, xq + i * padded * BLOCK, dx + i * padded, cx + i * padded, blocks,
                           per_group);
}
#endif

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

/* Rows ahead whose codes and scales are prefetched: a decode step reads ~200 small matrices
   once each, from memory, as three streams (codes, scales, mins) the hardware prefetcher
   picks up only after a while (4 rows ahead: 8-13% off a SmolLM2 token's kernel time). */
#define PREFETCH_ROWS 4

/* y (m, n) = x (m, k) @ W^T for W (n, k) in `scheme`; m is small (decode, short prompts). */
int quant_gemv(int scheme, const void *codes, const uint16_t *scales, const uint16_t *mins,
               const float *x, float *y, int64_t m, int64_t n, int64_t k, int64_t group, int threads) {
    /* a second thread is not worth its wake-up for a tiny matrix */
    int use = n * k < 32768 ? 1 : threads;
    if (scheme == BF16 || scheme == FP16) {
        #pragma omp parallel for num_threads(use) if(use > 1) schedule(static)
        for (int64_t r = 0; r < n; ++r)
            for (int64_t i = 0; i < m; ++i)
                y[i * n + r] = dot_half(scheme, (const uint16_t *)codes + r * k, x + i * k, k);
        return 0;
    }
    int64_t blocks = k / BLOCK, padded = padded_blocks(blocks), per_group = group / BLOCK;
    int8_t *xq = calloc((size_t)(m * padded * BLOCK), 1);
    float *dx = calloc((size_t)(2 * m * padded), sizeof(float));
    if (!xq || !dx) { free(xq); free(dx); return 1; }
    float *cx = dx + m * padded;
    for (int64_t i = 0; i < m; ++i)
        quantize_activations(scheme, x + i * k, k, xq + i * padded * BLOCK, dx + i * padded, cx + i * padded);
    int64_t row_bytes = scheme == Q8_0 ? k : k / 2, row_groups = k / group;
    #pragma omp parallel for num_threads(use) if(use > 1) schedule(static)
    for (int64_t r = 0; r < n; ++r) {
        const uint8_t *w = (const uint8_t *)codes + r * row_bytes;
        const uint16_t *sw = scales + r * row_groups, *mw = scheme == Q4_1 ? mins + r * row_groups : 0;
        if (r + PREFETCH_ROWS < n) {
            const char *next = (const char *)w + PREFETCH_ROWS * row_bytes;
            for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(next + off);
            __builtin_prefetch(sw + PREFETCH_ROWS * row_groups);
            if (mw) __builtin_prefetch(mw + PREFETCH_ROWS * row_groups);
        }
        dot_rows(scheme, w, sw, mw, xq, dx, cx, padded, blocks, per_group, m, y + r, n);
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
    return build_library(_FLAG_SETS)


def build_library(flag_sets: list[list[str]], name: str = "quant") -> ctypes.CDLL | None:
    """The kernel built with the first flag set that compiles, its dequantize typed (the GEMV
    is called by address, see `_gemv_address`)."""
    lib = load_library(name, _SOURCE, flag_sets, "SLM_QUANT_NATIVE")
    if lib is None:
        return None
    lib.quant_dequantize.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.quant_dequantize.restype = None
    return lib


@torch.compiler.assume_constant_result
def _built() -> bool:
    """Whether the library is here (its GEMV op then registered); a constant for
    torch.compile, which cannot trace a build."""
    if _library() is None:
        return False
    _register_gemv()
    return True


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


_GEMV_TYPE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, *[ctypes.c_void_p] * 5, *[ctypes.c_int64] * 4, ctypes.c_int)


@torch.compiler.assume_constant_result
def _gemv_address() -> int:
    """Where the current library's `quant_gemv` lies: the GEMV op calls the kernel it is
    given, so a test that swaps in another build (the portable one) runs that build."""
    return _function_address(_library())


@functools.cache
def _function_address(lib: ctypes.CDLL) -> int:
    return ctypes.cast(lib.quant_gemv, ctypes.c_void_p).value


def _gemv(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, scheme: int,
          group_size: int, kernel: int) -> torch.Tensor:
    """The GEMV op's Python impl (when no C++ compiler built `_OPS_SOURCE`): y = x @ W^T for
    contiguous float32 x (M <= SMALL_BATCH, K) by the kernel at address `kernel`."""
    m, k = x.shape
    y = x.new_empty(m, codes.shape[0])
    failed = _GEMV_TYPE(kernel)(scheme, codes.data_ptr(), scales.data_ptr(), mins.data_ptr(), x.data_ptr(),
                                y.data_ptr(), m, codes.shape[0], k, group_size, torch.get_num_threads())
    if failed:
        raise torch.OutOfMemoryError(f"quant_gemv could not allocate {m * k} bytes of activation codes")
    return y


# The same impl in C++, checking what the Python wrapper guarantees (a direct call with
# other tensors gets an error, not a crash).
_OPS_SOURCE = r"""
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

typedef int (*gemv_fn)(int, const void *, const void *, const void *, const float *, float *,
                       int64_t, int64_t, int64_t, int64_t, int);

static at::Tensor quant_gemv(const at::Tensor &x, const at::Tensor &codes, const at::Tensor &scales,
                             const at::Tensor &mins, int64_t scheme, int64_t group_size, int64_t kernel) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
                "quant_gemv: x must be a contiguous 2-D float32 tensor");
    TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() && scales.is_contiguous() && mins.is_contiguous(),
                "quant_gemv: the packed weight tensors must be contiguous");
    int64_t m = x.size(0), n = codes.size(0), k = x.size(1);
    at::Tensor y = at::empty({m, n}, x.options());
    int failed = reinterpret_cast<gemv_fn>(kernel)((int)scheme, codes.data_ptr(), scales.data_ptr(),
        mins.data_ptr(), x.data_ptr<float>(), y.data_ptr<float>(), m, n, k, group_size, at::get_num_threads());
    TORCH_CHECK_WITH(OutOfMemoryError, !failed, "quant_gemv could not allocate ", m * k, " bytes of activation codes");
    return y;
}

TORCH_LIBRARY_IMPL(simplified_slm, CPU, m) { m.impl("quant_gemv", quant_gemv); }
"""


# Registered through the low-level `torch.library.Library` rather than
# `torch.library.custom_op`, whose Python wrapper layers cost about twice the dispatch.
# `kernel` is the address of a built library's quant_gemv (internal: `_gemv_address`).
# No autograd here: `_FrozenWeightMatmul` serves gradients.
_LIBRARY = torch.library.Library("simplified_slm", "FRAGMENT")
_LIBRARY.define("quant_gemv(Tensor x, Tensor codes, Tensor scales, Tensor mins, int scheme, int group_size, "
                "int kernel) -> Tensor")
_LIBRARY.define("dequantized_matmul(Tensor x, Tensor codes, Tensor scales, Tensor mins, str scheme, "
                "int group_size) -> Tensor")
_LIBRARY.impl("dequantized_matmul", _dequantized_matmul, "CPU")


@functools.cache
def _register_gemv() -> None:
    """The GEMV op's impl, once: the C++ one where it builds, else `_gemv`."""
    if not load_torch_ops("quant_ops", _OPS_SOURCE, "SLM_QUANT_NATIVE"):
        _LIBRARY.impl("quant_gemv", _gemv, "CPU")


@torch.library.register_fake("simplified_slm::quant_gemv")
@torch.library.register_fake("simplified_slm::dequantized_matmul")
def _matmul_shape(x: torch.Tensor, codes: torch.Tensor, *_: Any) -> torch.Tensor:
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
    x2 = x2.contiguous()
    if x2.shape[0] <= SMALL_BATCH:
        y = torch.ops.simplified_slm.quant_gemv.default(x2, codes, scales, mins, _SCHEME_ID[scheme],
                                                        group_size or BLOCK, _gemv_address())
    elif torch.compiler.is_compiling():
        y = torch.ops.simplified_slm.dequantized_matmul.default(x2, codes, scales, mins, scheme, group_size)
    else:
        y = _dequantized_matmul(x2, codes, scales, mins, scheme, group_size)
    y = y.view(*lead, codes.shape[0])
    return y if x.dtype is torch.float32 else y.to(x.dtype)
