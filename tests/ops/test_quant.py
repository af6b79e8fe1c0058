"""Quantized weight formats: round trips, GGUF blocks against gguf's own decoder, and the C
kernel against the pure-PyTorch reference."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from simplified_slm.errors import SLMError
from simplified_slm.ops import native_build, quant, quant_native

INT_SCHEMES = ["q8_0", "q4_0", "q4_1"]
# Worst error of one weight relative to its group's largest |w|: half a step of the code grid
# (q4_0: a whole step on the side opposite the largest weight, whose codes stop at 7 d, not 8 d).
ROUND_TRIP_BOUND = {"q8_0": 0.5 / 127, "q4_0": 1 / 8, "q4_1": 0.5 / 15 * 2, "bf16": 2 ** -8, "fp16": 2 ** -11}


@pytest.fixture(autouse=True)
def _kernel_enabled(monkeypatch):
    """A developer's SLM_QUANT_NATIVE=0 must not turn the kernel tests into fallback tests."""
    if os.environ.get("SLM_QUANT_NATIVE") == "0":
        monkeypatch.delenv("SLM_QUANT_NATIVE")
    quant_native._library.cache_clear()
    yield
    quant_native._library.cache_clear()


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    w[0, :5] = 0.0  # a partly zero group, and (below) a wholly zero one: scale 0 must not divide
    if cols >= 128:
        w[1, :128] = 0.0
    return w


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_round_trip_error_is_within_half_a_code_step(scheme, group_size):
    w = _weight(24, 256)
    back = quant.dequantize(quant.quantize(w, scheme, group_size))
    assert back.shape == w.shape and back.dtype == torch.float32
    if scheme in quant.FLOAT_SCHEMES:
        assert ((back - w).abs() <= ROUND_TRIP_BOUND[scheme] * w.abs()).all()
        return
    peak = w.reshape(24, -1, group_size).abs().amax(-1, keepdim=True)
    err = (back - w).reshape(24, -1, group_size).abs()
    # + fp16 rounding of the stored scale, which moves every code's value a little
    assert (err <= peak * (ROUND_TRIP_BOUND[scheme] + 1e-3) + 1e-7).all()
    assert (back[0, :5] == 0).all() if scheme != "q4_1" else True
    if group_size <= 128:
        assert (back[1, :128] == 0).all()


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_decode_bit_for_bit_like_gguf(name):
    w = _weight(40, 160, seed=1).numpy()
    raw = gguf.quants.quantize(w, GGMLQuantizationType[name])  # (rows, bytes per row) uint8
    want = gguf.quants.dequantize(raw, GGMLQuantizationType[name])
    qw = quant.from_gguf_blocks(raw, name, (40, 160))
    assert np.array_equal(quant.dequantize(qw).numpy(), want)
    assert np.array_equal(quant.from_gguf_blocks(raw.tobytes(), name, (40, 160)).codes.numpy(), qw.codes.numpy())
    # our quantizer rounds as llama.cpp's does: the same blocks from the float weight
    ours = quant.quantize(torch.from_numpy(w), name.lower(), 32)
    for field in ("codes", "scales", "mins"):
        assert torch.equal(getattr(ours, field), getattr(qw, field)), field


def test_gguf_errors_are_one_line_slm_errors():
    raw = gguf.quants.quantize(_weight(4, 64).numpy(), GGMLQuantizationType.Q4_0)
    with pytest.raises(SLMError, match="needs 144 bytes, got 72"):
        quant.from_gguf_blocks(raw[:2], "Q4_0", (4, 64))
    with pytest.raises(SLMError, match="requantize to q8_0"):
        quant.from_gguf_blocks(raw, "Q6_K", (4, 64))


def test_bad_scheme_and_group_size_name_the_fix():
    with pytest.raises(SLMError, match="unknown quantization scheme 'int3'; use one of q8_0"):
        quant.quantize(torch.zeros(4, 64), "int3")
    with pytest.raises(SLMError, match="group size 48 is not supported"):
        quant.quantize(torch.zeros(4, 96), "q8_0", 48)
    with pytest.raises(SLMError, match="in_features 96 is not divisible by group size 64"):
        quant.quantize(torch.zeros(4, 96), "q4_0", 64)


@pytest.mark.parametrize("scheme", INT_SCHEMES)
def test_quantized_activation_reference_is_close_to_the_float_reference(scheme):
    # the two numerics the fast paths use differ only by int8 rounding of the activations
    w, x = _weight(64, 256), torch.randn(3, 256, generator=torch.Generator().manual_seed(2))
    qw = quant.quantize(w, scheme, 32)
    exact = quant.reference_matmul(x, qw, quantized_activations=False)
    torch.testing.assert_close(exact, x @ quant.dequantize(qw).T)
    approx = quant.reference_matmul(x, qw, quantized_activations=True)
    assert (approx - exact).norm() / exact.norm() < 0.01


def test_kernel_is_built_where_a_compiler_exists():
    if native_build.compiler() is not None:
        assert quant_native.native_available(torch.zeros(2))
    assert not quant_native.native_available(torch.zeros(2, dtype=torch.int64))


# odd shapes: a single output row, rows not a multiple of any vector width, K of one block
SHAPES = [(1, 32), (7, 96), (33, 256), (200, 576)]


@pytest.mark.parametrize("scheme", quant.SCHEMES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_the_reference(scheme, shape):
    if not quant_native.native_available(torch.zeros(1)):
        pytest.skip("no C compiler here: the float reference runs, covered by the layer tests")
    rows, cols = shape
    gen = torch.Generator().manual_seed(rows)
    for group_size in ([32] if scheme in quant.FLOAT_SCHEMES else [g for g in (32, 64, 128) if cols % g == 0]):
        qw = quant.quantize(_weight(rows, cols, seed=rows), scheme, group_size)
        for m in (1, 5, quant_native.SMALL_BATCH, quant_native.SMALL_BATCH + 3):
            x = torch.randn(m, cols, generator=gen)
            got = quant_native.quantized_matmul(x, qw.codes, qw.scales, qw.mins, scheme, qw.group_size)
            want = quant.reference_matmul(x, qw, quantized_activations=m <= quant_native.SMALL_BATCH)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_portable_kernel_build_matches_the_reference(scheme, monkeypatch):
    """The build without -march=native (what a CPU without AVX-512 VNNI compiles: the scalar
    dot products, activation codes in natural order) computes the same numerics."""
    if native_build.compiler() is None:
        pytest.skip("no C compiler here")
    portable = quant_native.build_library(quant_native._FLAG_SETS[1:], name="quant_portable")
    monkeypatch.setattr(quant_native, "_library", functools.cache(lambda: portable))
    gen = torch.Generator().manual_seed(3)
    for rows, cols in SHAPES:
        for group_size in ([32] if scheme in quant.FLOAT_SCHEMES else [g for g in (32, 128) if cols % g == 0]):
            qw = quant.quantize(_weight(rows, cols, seed=rows), scheme, group_size)
            x = torch.randn(3, cols, generator=gen)
            got = quant_native.quantized_matmul(x, qw.codes, qw.scales, qw.mins, scheme, qw.group_size)
            want = quant.reference_matmul(x, qw, quantized_activations=True)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_large_batches_widen_the_weight_a_slice_at_a_time(scheme, monkeypatch):
    """Prefill and the reference both work through row slices of W (a 1B model's head would
    otherwise be 1 GB of float32); slices that do not divide the rows give the same values
    (up to the GEMM's summation order, which depends on the output width)."""
    qw = quant.quantize(_weight(37, 64), scheme, 32)
    x = torch.randn(quant_native.SMALL_BATCH + 5, 64, generator=torch.Generator().manual_seed(5))
    whole = x @ quant.dequantize(qw).T
    tolerance = {"rtol": 1e-5, "atol": 1e-5 * whole.abs().max().item()}
    monkeypatch.setattr(quant, "_REFERENCE_CHUNK", 10 * 64)  # 10 rows per slice
    torch.testing.assert_close(quant.reference_matmul(x, qw, quantized_activations=False), whole, **tolerance)
    if scheme in INT_SCHEMES:  # exact integer block dots: slicing changes no bit
        sliced = quant.reference_matmul(x[:3], qw, quantized_activations=True)
        monkeypatch.setattr(quant, "_REFERENCE_CHUNK", 1 << 18)
        assert torch.equal(sliced, quant.reference_matmul(x[:3], qw, quantized_activations=True))
    if quant_native.native_available(x):
        monkeypatch.setattr(quant_native, "_DEQUANTIZED_SLICE_BYTES", 10 * 64 * 4)
        got = quant_native.quantized_matmul(x, qw.codes, qw.scales, qw.mins, scheme, qw.group_size)
        torch.testing.assert_close(got, whole, **tolerance)


@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_native_dequantize_is_bit_identical(scheme):
    if not quant_native.native_available(torch.zeros(1)):
        pytest.skip("no C compiler here")
    qw = quant.quantize(_weight(9, 256), scheme, 64 if scheme in INT_SCHEMES else 32)
    got = quant_native._dequantize_native(qw.codes, qw.scales, qw.mins, scheme, qw.group_size, 256)
    assert torch.equal(got, quant.dequantize(qw))


def test_kernel_keeps_input_dtype_and_leading_dims():
    qw = quant.quantize(_weight(16, 64), "q4_1", 32)
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    y = quant_native.quantized_matmul(x, qw.codes, qw.scales, qw.mins, "q4_1", 32)
    assert y.shape == (2, 3, 16) and y.dtype == torch.bfloat16


def test_disabled_kernel_falls_back_to_the_float_reference(monkeypatch):
    monkeypatch.setenv("SLM_QUANT_NATIVE", "0")
    quant_native._library.cache_clear()
    assert not quant_native.native_available(torch.zeros(1))
    qw = quant.quantize(_weight(16, 64), "q4_0", 32)
    x = torch.randn(1, 64)
    got = quant_native.quantized_matmul(x, qw.codes, qw.scales, qw.mins, "q4_0", 32)
    torch.testing.assert_close(got, x @ quant.dequantize(qw).T)


@pytest.mark.parametrize("m", [1, quant_native.SMALL_BATCH + 1])
def test_registered_ops_pass_torch_opcheck(m):
    # schema, fake impl and real impl agree, as torch.compile relies on
    if not quant_native.native_available(torch.zeros(1)):
        pytest.skip("no C compiler here")
    qw = quant.quantize(_weight(24, 64), "q4_1", 32)
    x = torch.randn(m, 64)
    if m <= quant_native.SMALL_BATCH:
        op = torch.ops.simplified_slm.quant_gemv.default
        args = (x, qw.codes, qw.scales, qw.mins, quant_native._SCHEME_ID["q4_1"], 32, quant_native._gemv_address())
    else:
        op, args = torch.ops.simplified_slm.dequantized_matmul.default, (x, qw.codes, qw.scales, qw.mins, "q4_1", 32)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_gemv_op_runs_the_cpp_impl_and_the_python_one_agrees():
    """With a C++ compiler the GEMV op's impl is the C++ shim (the dispatch cost a decode
    step pays ~210 times per token); the Python impl that serves without one gives the same
    values from the same kernel."""
    if native_build.cxx_compiler() is None or not quant_native.native_available(torch.zeros(1)):
        pytest.skip("no C/C++ compiler here")
    registrations = torch._C._dispatch_dump("simplified_slm::quant_gemv")
    assert "quant_ops.cpp" in registrations, registrations
    qw = quant.quantize(_weight(40, 128), "q4_0", 32)
    x = torch.randn(5, 128)
    args = (x, qw.codes, qw.scales, qw.mins, quant_native._SCHEME_ID["q4_0"], 32, quant_native._gemv_address())
    assert torch.equal(torch.ops.simplified_slm.quant_gemv.default(*args), quant_native._gemv(*args))


def test_gemv_op_refuses_tensors_it_cannot_read():
    if native_build.cxx_compiler() is None or not quant_native.native_available(torch.zeros(1)):
        pytest.skip("no C/C++ compiler here")
    qw = quant.quantize(_weight(8, 64), "q8_0", 32)
    with pytest.raises(RuntimeError, match="contiguous 2-D float32"):
        torch.ops.simplified_slm.quant_gemv.default(torch.randn(64, 2).T, qw.codes, qw.scales, qw.mins, 0, 32,
                                                    quant_native._gemv_address())


def test_without_a_cpp_compiler_the_gemv_op_dispatches_through_python():
    """The Python impl registers when the C++ shim cannot build; a fresh process, since a
    process holds one impl per op."""
    if not quant_native.native_available(torch.zeros(1)):
        pytest.skip("no C compiler here")
    script = """
import torch
from simplified_slm.ops import native_build, quant, quant_native
native_build.cxx_compiler = lambda: None
qw = quant.quantize(torch.randn(24, 64), "q4_1", 32)
x = torch.randn(3, 64)
with torch.no_grad():
    got = quant_native.quantized_matmul(x, qw.codes, qw.scales, qw.mins, "q4_1", 32)
want = quant.reference_matmul(x, qw, quantized_activations=True)
torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
print("cpp" if "quant_ops.cpp" in torch._C._dispatch_dump("simplified_slm::quant_gemv") else "python")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "python"
