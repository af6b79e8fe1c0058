"""The fused recurrent HGRN scan as a small C kernel, built on first use.

Why a kernel: the scan is a few flops per byte, so its cost is memory traffic. One
sequential pass per direction (read i and f, write h; then read dO, f and h, write
di and df) is the minimum; the pure-PyTorch chunk form needs about three times that
traffic plus ~200 strided ops per call, and inductor cannot emit a loop with a carried
dependency (it unrolls, and the unrolled chunk passes gained ~25%). With thousands of
independent channels there is no need to split time at all on a CPU: each thread walks
its own block of channels from t = 0 to T - 1.

Built on first use by `ops/native_build.py` (plain C through ctypes, cached, atomic).

Numerics: multiply then add with contraction off, in the input dtype, exactly like the
naive reference, so forward and backward agree with it bit for bit (float32 and float64).
Half-precision inputs (bf16 autocast) are scanned in float32 and the output cast back, as
FLA's kernels do: a 2048-step recurrence carried in bf16 loses most of its mantissa.
Another device or a failed build falls back to the PyTorch forms; set `SLM_HGRN_NATIVE=0`
to force that.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any, Optional

import torch

from simplified_slm.ops.native_build import load_library

# One job walks whole rows of one sequence (up to MAX_BLOCK channels), so each array is
# read as one contiguous stream: splitting a row between threads measured 4x slower per
# element (the prefetcher loses strided half-rows), more than a second thread gains.
# Threads therefore share the batch x heads rows, and a single sequence runs on one.
_SOURCE = r"""
#include <stdint.h>

#define MAX_BLOCK 4096  /* = MAX_BLOCK below */

/* A job is one sequence's channels [d0, d0 + w), at most MAX_BLOCK of them. */
static int64_t block_of(int64_t dim) { return dim < MAX_BLOCK ? dim : MAX_BLOCK; }

static int64_t jobs_of(int64_t n, int64_t dim) {
    return n * ((dim + block_of(dim) - 1) / block_of(dim));
}

static void job_span(int64_t job, int64_t dim, int64_t *b, int64_t *d0, int64_t *w) {
    int64_t block = block_of(dim), blocks = (dim + block - 1) / block;
    *b = job / blocks;
    *d0 = (job % blocks) * block;
    *w = dim - *d0 < block ? dim - *d0 : block;
}

/* Threads worth waking: no more than there are jobs, and none for small work (a decode
   step): waking a team costs more than the step, and a lot more when a core is busy. */
static int team(int64_t jobs, int64_t elements, int threads) {
    if (elements < 65536) return 1;
    return jobs < threads ? (int)jobs : threads;
}

#define HGRN_KERNELS(T, SUFFIX)                                                         \
void hgrn_forward_##SUFFIX(const T *restrict x, const T *restrict a,                   \
                           const T *restrict h0, T *restrict out, int64_t n,           \
                           int64_t len, int64_t dim, int threads) {                    \
    int64_t jobs = jobs_of(n, dim), b, d0, w;                                         \
    int use = team(jobs, n * len * dim, threads);                                     \
    _Pragma("omp parallel for num_threads(use) if(use > 1) private(b, d0, w)")        \
    for (int64_t job = 0; job < jobs; ++job) {                                        \
        job_span(job, dim, &b, &d0, &w);                                              \
        T h[MAX_BLOCK];                                                               \
        for (int64_t k = 0; k < w; ++k) h[k] = h0 ? h0[b * dim + d0 + k] : (T)0;      \
        for (int64_t t = 0; t < len; ++t) {                                           \
            const T *xt = x + (b * len + t) * dim + d0;                               \
            const T *at = a + (b * len + t) * dim + d0;                               \
            T *ot = out + (b * len + t) * dim + d0;                                   \
            for (int64_t k = 0; k < w; ++k) {                                         \
                h[k] = at[k] * h[k] + xt[k];                                          \
                ot[k] = h[k];                                                         \
            }                                                                         \
        }                                                                             \
    }                                                                                 \
}                                                                                     \
                                                                                      \
void hgrn_backward_##SUFFIX(const T *restrict dout, const T *restrict a,              \
                            const T *restrict out, const T *restrict h0,              \
                            T *restrict dx, T *restrict da, T *restrict dh0,          \
                            int64_t n, int64_t len, int64_t dim, int threads) {       \
    int64_t jobs = jobs_of(n, dim), b, d0, w;                                         \
    int use = team(jobs, n * len * dim, threads);                                     \
    _Pragma("omp parallel for num_threads(use) if(use > 1) private(b, d0, w)")        \
    for (int64_t job = 0; job < jobs; ++job) {                                        \
        job_span(job, dim, &b, &d0, &w);                                              \
        T q[MAX_BLOCK];                                                               \
        for (int64_t k = 0; k < w; ++k) q[k] = (T)0;                                  \
        /* Channels run backwards too, so every stream walks memory downwards:        \
           a row up and a row left mixed confuses the hardware prefetcher. */         \
        for (int64_t t = len - 1; t >= 0; --t) {                                      \
            int64_t row = (b * len + t) * dim + d0;                                   \
            const T *dt = dout + row, *at = a + row;                                  \
            T *gt = dx + row, *ft = da + row;                                         \
            /* df_t = g_t * h_{t-1}; h_{-1} is the initial state, zero when absent */  \
            const T *prev = t ? out + row - dim : (h0 ? h0 + b * dim + d0 : 0);       \
            if (prev) {                                                               \
                for (int64_t k = w - 1; k >= 0; --k) {                                \
                    T g = dt[k] + q[k];                                               \
                    gt[k] = g;                                                        \
                    ft[k] = g * prev[k];                                              \
                    q[k] = at[k] * g;                                                 \
                }                                                                     \
            } else {                                                                  \
                for (int64_t k = w - 1; k >= 0; --k) {                                \
                    T g = dt[k] + q[k];                                               \
                    gt[k] = g;                                                        \
                    ft[k] = (T)0;                                                     \
                    q[k] = at[k] * g;                                                 \
                }                                                                     \
            }                                                                         \
        }                                                                             \
        if (dh0)                                                                      \
            for (int64_t k = 0; k < w; ++k) dh0[b * dim + d0 + k] = q[k];             \
    }                                                                                 \
}

HGRN_KERNELS(float, f32)
HGRN_KERNELS(double, f64)
"""

MAX_BLOCK = 4096  # channels one job walks at most (the C macro of the same name)
_FLAGS = ["-O3", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off"]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The built kernel library, or None when it cannot be had here (then the PyTorch forms run)."""
    # With OpenMP first; a compiler without it (Apple clang) still gives a serial kernel.
    lib = load_library("HGRN", _SOURCE, [[*_FLAGS, "-fopenmp"], _FLAGS], "SLM_HGRN_NATIVE")
    if lib is None:
        return None
    ptr, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suffix in _SUFFIX.values():
        getattr(lib, f"hgrn_forward_{suffix}").argtypes = [ptr] * 4 + [i64] * 3 + [c_int]
        getattr(lib, f"hgrn_backward_{suffix}").argtypes = [ptr] * 7 + [i64] * 3 + [c_int]
    return lib


_UPCAST = (torch.float16, torch.bfloat16)


@torch.compiler.assume_constant_result
def _built() -> bool:
    """Whether the library is here; a constant for torch.compile, which cannot trace a build."""
    return _library() is not None


def native_available(x: torch.Tensor) -> bool:
    """True when the C kernel can run on `x` (a CPU float tensor and a built library)."""
    return x.device.type == "cpu" and (x.dtype in _SUFFIX or x.dtype in _UPCAST) and _built()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# Registered as torch custom ops (not an autograd.Function) so torch.compile keeps them in
# its graph as opaque calls instead of breaking the graph around a ctypes call.
@torch.library.custom_op("simplified_slm::hgrn_scan", mutates_args=())
def _scan_op(i: torch.Tensor, f: torch.Tensor, h0: Optional[torch.Tensor]) -> torch.Tensor:  # noqa: UP045
    """h_t = f_t * h_{t-1} + i_t on contiguous (N, T, D) inputs of one float dtype."""
    n, length, dim = i.shape
    o = torch.empty_like(i)
    kernel = getattr(_library(), f"hgrn_forward_{_SUFFIX[i.dtype]}")
    kernel(_ptr(i), _ptr(f), _ptr(h0), _ptr(o), n, length, dim, torch.get_num_threads())
    return o


@_scan_op.register_fake
def _scan_shape(i: torch.Tensor, f: torch.Tensor, h0: Optional[torch.Tensor]) -> torch.Tensor:  # noqa: UP045
    return torch.empty_like(i)


@torch.library.custom_op("simplified_slm::hgrn_scan_backward", mutates_args=())
def _scan_backward_op(
    do: torch.Tensor, f: torch.Tensor, o: torch.Tensor, h0: Optional[torch.Tensor]  # noqa: UP045
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reversed scan: (di, df, dh0); dh0 is empty when there is no initial state."""
    n, length, dim = f.shape
    di, df = torch.empty_like(f), torch.empty_like(f)
    dh0 = torch.empty_like(h0) if h0 is not None else f.new_empty(0)
    kernel = getattr(_library(), f"hgrn_backward_{_SUFFIX[f.dtype]}")
    kernel(
        _ptr(do), _ptr(f), _ptr(o), _ptr(h0), _ptr(di), _ptr(df), _ptr(dh0 if h0 is not None else None),
        n, length, dim, torch.get_num_threads(),
    )  # fmt: skip
    return di, df, dh0


@_scan_backward_op.register_fake
def _scan_backward_shape(
    do: torch.Tensor, f: torch.Tensor, o: torch.Tensor, h0: Optional[torch.Tensor]  # noqa: UP045
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(f), torch.empty_like(f), torch.empty_like(h0) if h0 is not None else f.new_empty(0)


def _save_for_backward(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    _, f, h0 = inputs
    ctx.save_for_backward(f, output, h0)


def _backward(ctx: Any, do: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    f, o, h0 = ctx.saved_tensors
    di, df, dh0 = _scan_backward_op(do.contiguous(), f, o, h0)
    return di, df, dh0 if h0 is not None else None


_scan_op.register_autograd(_backward, setup_context=_save_for_backward)


def native_scan(i: torch.Tensor, f: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """The recurrence over (N, T, D) inputs already checked by `common.flatten_hgrn_inputs`."""
    dtype = torch.float32 if i.dtype in _UPCAST else i.dtype
    h0 = None if h0 is None else h0.to(dtype).contiguous()
    o = _scan_op(i.to(dtype).contiguous(), f.to(dtype).contiguous(), h0)
    return o.to(i.dtype)
