"""HGRN recurrence: chunk and fused-recurrent forms against the naive reference."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from simplified_slm.errors import SLMError
from simplified_slm.ops.hgrn import chunk_hgrn, fused_recurrent_hgrn, hgrn, naive_recurrent_hgrn
from simplified_slm.ops import native_build
from simplified_slm.ops.hgrn import native
from simplified_slm.ops.hgrn.chunk import _chunk_size

@pytest.fixture(autouse=True)
def _kernel_enabled(monkeypatch):
    """These tests are about the kernel too: a developer's SLM_HGRN_NATIVE=0 (which models
    honour) must not quietly turn them into tests of the fallback."""
    if os.environ.get("SLM_HGRN_NATIVE") != "0":
        yield
        return
    monkeypatch.delenv("SLM_HGRN_NATIVE")
    native._library.cache_clear()
    yield
    native._library.cache_clear()


# 1 (single token), 2, odd lengths, and lengths with whole chunks plus a ragged tail.
LENGTHS = [1, 2, 7, 33, 100, 257]
GATES = ["uniform", "near0", "near1", "mixed"]


def _gates(kind: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    near0 = 1e-6 * u
    near1 = 1 - 1e-6 * u
    if kind == "uniform":
        f = u
    elif kind == "near0":
        f = near0
    elif kind == "near1":
        f = near1
    else:
        pick = torch.randint(0, 3, shape, generator=gen)
        f = torch.where(pick == 0, near0, torch.where(pick == 1, u, near1))
    return f.to(dtype)


def _case(
    length: int, gates: str, with_state: bool, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    shape = (2, length, 6)
    i = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    f = _gates(gates, shape, dtype, gen)
    h0 = torch.randn(2, 6, generator=gen, dtype=torch.float64).to(dtype) if with_state else None
    return i, f, h0


def _run(fn, i, f, h0):
    """Outputs and gradients of a random linear loss on o and the final state."""
    leaves = [t.detach().clone().requires_grad_() for t in (i, f)]
    state = None if h0 is None else h0.detach().clone().requires_grad_()
    o, final = fn(*leaves, state, True)
    gen = torch.Generator().manual_seed(1)
    w_o = torch.randn(o.shape, generator=gen, dtype=o.dtype)
    w_s = torch.randn(final.shape, generator=gen, dtype=o.dtype)
    ((o * w_o).sum() + (final * w_s).sum()).backward()
    grads = [t.grad for t in leaves] + ([] if state is None else [state.grad])
    return [o.detach(), final.detach(), *grads]


def test_lengths_cover_whole_chunks_with_and_without_a_ragged_tail():
    several_chunks = [t for t in LENGTHS if t // _chunk_size(t) >= 2]
    assert any(t % _chunk_size(t) for t in several_chunks)
    assert any(t % _chunk_size(t) == 0 for t in several_chunks)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("gates", GATES)
@pytest.mark.parametrize("length", LENGTHS)
def test_chunk_matches_naive_float64(length, gates, with_state):
    i, f, h0 = _case(length, gates, with_state, torch.float64)
    for got, want in zip(_run(chunk_hgrn, i, f, h0), _run(naive_recurrent_hgrn, i, f, h0)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("gates", GATES)
@pytest.mark.parametrize("length", [1, 100, 2048])
def test_chunk_matches_naive_float32(length, gates, with_state):
    i, f, h0 = _case(length, gates, with_state, torch.float32)
    for got, want in zip(_run(chunk_hgrn, i, f, h0), _run(naive_recurrent_hgrn, i, f, h0)):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("fn", [chunk_hgrn, fused_recurrent_hgrn])
def test_gradcheck(fn):
    i, f, h0 = _case(9, "uniform", True, torch.float64)
    inputs = tuple(t.requires_grad_() for t in (i, f, h0))
    assert torch.autograd.gradcheck(lambda a, b, c: fn(a, b, c, True), inputs)


@pytest.fixture(params=["native", "stepping"])
def fused_form(request, monkeypatch):
    """fused_recurrent_hgrn on the C kernel, and on in-place stepping (the fallback)."""
    if request.param == "stepping":
        monkeypatch.setattr(native, "native_available", lambda x: False)
        monkeypatch.setattr("simplified_slm.ops.hgrn.recurrent_fuse.native_available", lambda x: False)
    return request.param


def test_c_kernel_is_built_where_a_compiler_exists():
    # CI and this machine have a compiler: the fast path must really be in use there,
    # so the native-form tests below cannot silently test the fallback instead.
    if native_build.compiler() is not None:
        assert native.native_available(torch.zeros(1, 2, 3))
    assert not native.native_available(torch.zeros(1, 2, 3, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_scanned_in_float32(dtype):
    # 2048 steps with gates near 1 carried in bf16 would drift far; the kernel carries
    # float32 and rounds only the output, so it stays within one half-precision ulp.
    i, f, h0 = _case(2048, "near1", True, torch.float32)
    i, f, h0 = i.to(dtype), f.to(dtype), h0.to(dtype)
    leaves = [t.clone().requires_grad_() for t in (i, f, h0)]
    o, final = fused_recurrent_hgrn(*leaves, True)
    assert o.dtype == dtype and final.dtype == dtype
    want, _ = naive_recurrent_hgrn(i.float(), f.float(), h0.float())
    assert ((o.float() - want).abs() <= 2 ** -7 * want.abs() + 1e-6).all()
    o.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == dtype for t in leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("gates", GATES)
@pytest.mark.parametrize("length", LENGTHS)
def test_fused_recurrent_equals_naive(fused_form, length, gates, with_state, dtype):
    i, f, h0 = _case(length, gates, with_state, dtype)
    got, want = _run(fused_recurrent_hgrn, i, f, h0), _run(naive_recurrent_hgrn, i, f, h0)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for g, w in zip(got[2:], want[2:]):  # same operations in the same order: bit for bit
        assert torch.equal(g, w)


def test_c_kernel_rows_wider_than_one_job_and_threads_agree():
    # 4100 channels split into two jobs per row; results must not depend on the thread count
    gen = torch.Generator().manual_seed(5)
    i = torch.randn(3, 9, native.MAX_BLOCK + 4, generator=gen)
    f = torch.rand(3, 9, native.MAX_BLOCK + 4, generator=gen)
    h0 = torch.randn(3, native.MAX_BLOCK + 4, generator=gen)
    want = _run(naive_recurrent_hgrn, i, f, h0)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for got, w in zip(_run(fused_recurrent_hgrn, i, f, h0), want):
                assert torch.equal(got, w)
    finally:
        torch.set_num_threads(threads)


def test_broken_compiler_falls_back_to_the_chunk_form(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", "false")  # exists, always fails
    monkeypatch.setenv("SLM_KERNEL_CACHE", str(tmp_path))
    native._library.cache_clear()
    try:
        i, f, h0 = _case(40, "mixed", True, torch.float64)
        with caplog.at_level("WARNING"):
            assert not native.native_available(i)
        assert "HGRN C kernel unavailable" in caplog.text
        for got, want in zip(_run(hgrn, i, f, h0), _run(naive_recurrent_hgrn, i, f, h0)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        assert list(tmp_path.iterdir()) == []  # no half-built file left behind
    finally:
        native._library.cache_clear()


def test_kernel_cache_is_written_once_and_reused(tmp_path, monkeypatch):
    if native_build.compiler() is None:
        pytest.skip("no C compiler on this machine: the fallback test covers it")
    monkeypatch.setenv("SLM_KERNEL_CACHE", str(tmp_path))
    native._library.cache_clear()
    try:
        assert native._library() is not None
        (built,) = tmp_path.iterdir()
        stamp = built.stat().st_mtime_ns
        native._library.cache_clear()
        assert native._library() is not None
        assert [p.name for p in tmp_path.iterdir()] == [built.name]
        assert built.stat().st_mtime_ns == stamp
    finally:
        native._library.cache_clear()


def test_opting_out_uses_the_pytorch_forms(monkeypatch):
    monkeypatch.setenv("SLM_HGRN_NATIVE", "0")
    native._library.cache_clear()
    try:
        assert not native.native_available(torch.zeros(1, 2, 3))
    finally:
        native._library.cache_clear()


def test_stepping_one_token_at_a_time_equals_full_reference():
    i, f, h0 = _case(37, "mixed", True, torch.float32)
    want, _ = naive_recurrent_hgrn(i, f, h0)
    state, steps = h0, []
    for t in range(i.shape[1]):
        o, state = fused_recurrent_hgrn(i[:, t : t + 1], f[:, t : t + 1], state, True)
        steps.append(o)
    assert torch.equal(torch.cat(steps, dim=1), want)


def test_prefill_with_chunk_then_decode_continues_the_sequence():
    i, f, _ = _case(120, "uniform", False, torch.float64)
    want, _ = naive_recurrent_hgrn(i, f)
    prefix, state = chunk_hgrn(i[:, :100], f[:, :100], output_final_state=True)
    rest, _ = fused_recurrent_hgrn(i[:, 100:], f[:, 100:], state)
    torch.testing.assert_close(torch.cat([prefix, rest], dim=1), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", [naive_recurrent_hgrn, chunk_hgrn, fused_recurrent_hgrn])
def test_heads_are_batch(fn):
    gen = torch.Generator().manual_seed(3)
    i = torch.randn(2, 3, 50, 4, generator=gen, dtype=torch.float64)
    f = torch.rand(2, 3, 50, 4, generator=gen, dtype=torch.float64)
    h0 = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    o, final = fn(i, f, h0, True)
    o_flat, final_flat = naive_recurrent_hgrn(i.flatten(0, 1), f.flatten(0, 1), h0.flatten(0, 1), True)
    torch.testing.assert_close(o, o_flat.view(2, 3, 50, 4), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, final_flat.view(2, 3, 4), rtol=1e-12, atol=1e-12)


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(4)
    proj = torch.randn(3, 70, 16, generator=gen, dtype=torch.float64)
    i, f = proj.chunk(2, dim=-1)
    f = f.sigmoid()
    for fn in (chunk_hgrn, fused_recurrent_hgrn):
        torch.testing.assert_close(fn(i, f)[0], naive_recurrent_hgrn(i, f)[0], rtol=1e-12, atol=1e-12)


def test_broadcast_upstream_gradient():
    # o.sum() hands the backward an expanded (stride 0) gradient
    i, f, h0 = _case(50, "uniform", True, torch.float64)
    grads = []
    for fn in (naive_recurrent_hgrn, chunk_hgrn, fused_recurrent_hgrn):
        leaves = [t.clone().requires_grad_() for t in (i, f, h0)]
        fn(*leaves)[0].sum().backward()
        grads.append([t.grad for t in leaves])
    for other in grads[1:]:
        for got, want in zip(other, grads[0]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_no_final_state_unless_asked():
    i, f, _ = _case(5, "uniform", False, torch.float32)
    for fn in (naive_recurrent_hgrn, chunk_hgrn, fused_recurrent_hgrn):
        assert fn(i, f)[1] is None


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 80),
    dim=st.integers(1, 5),
    with_state=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_chunk_matches_naive_any_shape(batch, length, dim, with_state, seed):
    gen = torch.Generator().manual_seed(seed)
    i = torch.randn(batch, length, dim, generator=gen, dtype=torch.float64)
    f = torch.rand(batch, length, dim, generator=gen, dtype=torch.float64)
    h0 = torch.randn(batch, dim, generator=gen, dtype=torch.float64) if with_state else None
    for got, want in zip(_run(chunk_hgrn, i, f, h0), _run(naive_recurrent_hgrn, i, f, h0)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fn", [naive_recurrent_hgrn, chunk_hgrn, fused_recurrent_hgrn, hgrn])
@pytest.mark.parametrize(
    ("i_shape", "f_shape", "h0_shape", "match"),
    [
        ((8,), (8,), None, "batch, time, dim"),
        ((4, 8), (4, 8), None, "batch, time, dim"),
        ((2, 4, 8), (2, 4, 7), None, "forget gate"),
        ((2, 4, 8), (2, 4, 8), (2, 4, 8), "initial_state"),
        ((2, 0, 8), (2, 0, 8), None, "empty sequence"),
    ],
)
def test_impossible_shapes_raise_slm_error(fn, i_shape, f_shape, h0_shape, match):
    h0 = None if h0_shape is None else torch.zeros(h0_shape)
    with pytest.raises(SLMError, match=match):
        fn(torch.zeros(i_shape), torch.zeros(f_shape), h0)


def test_c_kernel_ops_pass_torch_opcheck():
    # schema, fake (meta) implementation and autograd registration, as torch checks them
    i, f, h0 = _case(20, "mixed", True, torch.float64)
    for state in (h0, None):
        args = (i.requires_grad_(), f.requires_grad_(), None if state is None else state.requires_grad_())
        torch.library.opcheck(native._scan_op, args)


def test_hgrn_compiles_without_graph_breaks():
    i, f, h0 = _case(30, "uniform", True, torch.float32)
    step = torch.compile(lambda a, b, c: hgrn(a * 2, b, c, True), fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (i, f, h0)]
    o, final = step(*leaves)
    want, want_final = naive_recurrent_hgrn(i * 2, f, h0, True)
    torch.testing.assert_close(o, want)
    torch.testing.assert_close(final, want_final)
    o.sum().backward()
    assert all(t.grad is not None for t in leaves)
