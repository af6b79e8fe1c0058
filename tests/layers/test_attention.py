"""Shared attention: SDPA ("flash" where the device has it) vs the written-out eager path,
the automatic fallback, masks (causal, padding, sliding window) and the ring KV cache."""

import pytest
import torch
import torch.nn.functional as F

from simplified_slm import SLMError
from simplified_slm.layers import attention
from simplified_slm.layers.attention import AttentionBias, CausalSelfAttention, attend, attention_bias
from simplified_slm.layers.kv_cache import KVCache
from simplified_slm.layers.rope import RotaryEmbedding


def qkv(batch=2, heads=8, kv_heads=2, q_len=9, k_len=9, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, q_len, dim, generator=g), torch.randn(batch, kv_heads, k_len, dim, generator=g),
            torch.randn(batch, kv_heads, k_len, dim, generator=g))


def left_padding_mask(lengths, total):
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, total - n:] = 1
    return mask


def reference(q, k, v, allowed):
    """Attention from first principles: repeat kv heads, mask, softmax in float64."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1).double(), v.repeat_interleave(groups, 1).double()
    scores = q.double() @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    return (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).float()


CASES = {
    "causal": dict(past=0, q_len=9, mask=None, window=None),
    "padding": dict(past=0, q_len=9, mask=[9, 4], window=None),
    "sliding": dict(past=0, q_len=9, mask=None, window=3),
    "sliding+padding": dict(past=0, q_len=9, mask=[9, 5], window=4),
    "decode": dict(past=8, q_len=1, mask=None, window=None),
    "decode+padding+sliding": dict(past=8, q_len=1, mask=[9, 3], window=4),
    "chunk after cache": dict(past=5, q_len=4, mask=[9, 6], window=None),
}


@pytest.mark.parametrize("kv_heads", [8, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("case", list(CASES))
def test_sdpa_and_eager_agree_with_the_reference(case, kv_heads):
    spec = CASES[case]
    past, q_len = spec["past"], spec["q_len"]
    k_len = past + q_len
    q, k, v = qkv(kv_heads=kv_heads, q_len=q_len, k_len=k_len)
    mask = None if spec["mask"] is None else left_padding_mask(spec["mask"], k_len)
    bias = attention_bias(q_len, past, mask, spec["window"], torch.device("cpu"))
    q_pos, k_pos = torch.arange(past, k_len)[:, None], torch.arange(k_len)[None]
    allowed = k_pos <= q_pos
    if spec["window"]:
        allowed &= k_pos > q_pos - spec["window"]
    allowed = allowed.expand(2, 1, q_len, k_len)
    if mask is not None:
        allowed = (allowed & mask.bool()[:, None, None]) | (k_pos == q_pos)
    expected = reference(q, k, v, allowed)
    sdpa, eager = attend(q, k, v, bias, implementation="sdpa"), attend(q, k, v, bias, implementation="eager")
    assert (sdpa - eager).abs().max() <= 1e-5
    for out in (sdpa, eager):
        real = mask[:, past:].bool() if mask is not None else torch.ones(2, q_len, dtype=torch.bool)
        assert torch.allclose(out.transpose(1, 2)[real], expected.transpose(1, 2)[real], atol=1e-5)


def test_no_mask_is_built_for_plain_prefill_and_decode():
    cpu = torch.device("cpu")
    assert attention_bias(7, 0, None, None, cpu) == AttentionBias(None, True)
    assert attention_bias(1, 7, None, None, cpu) == AttentionBias(None, False)
    assert attention_bias(1, 7, torch.ones(1, 8, dtype=torch.long), None, cpu) == AttentionBias(None, False)
    assert attention_bias(1, 2, None, 4, cpu) == AttentionBias(None, False)  # window not reached yet
    assert attention_bias(1, 7, None, 4, cpu).mask is not None  # keys 0..3 are outside the window


def test_unsupported_dtype_falls_back_to_eager(monkeypatch):
    q, k, v = qkv(q_len=5, k_len=5)
    bias = AttentionBias(None, True)
    expected = attend(q, k, v, bias, implementation="eager")

    def refuse(*args, **kwargs):
        raise AssertionError("SDPA must not be called for a dtype it does not support")

    monkeypatch.setattr(attention, "SDPA_DTYPES", frozenset({torch.float16}))
    monkeypatch.setattr(F, "scaled_dot_product_attention", refuse)
    assert torch.equal(attend(q, k, v, bias, implementation="sdpa"), expected)


def test_half_precision_eager_matches_sdpa():
    q, k, v = (t.bfloat16() for t in qkv(q_len=6, k_len=6))
    bias = attention_bias(6, 0, left_padding_mask([6, 2], 6), 3, torch.device("cpu"))
    eager, sdpa = attend(q, k, v, bias, implementation="eager"), attend(q, k, v, bias, implementation="sdpa")
    assert eager.dtype == torch.bfloat16
    assert (eager.float() - sdpa.float()).abs().max() <= 2e-2


def test_cpu_bf16_training_takes_the_eager_kernel_where_sdpa_is_slower(monkeypatch):
    # SDPA's CPU backward in bf16 is 2-3x slower than the written-out attention for short keys;
    # "sdpa" then trains through the eager kernel, with the same values and gradients.
    q, k, v = (t.bfloat16().requires_grad_() for t in qkv(q_len=12, k_len=12))
    bias = attention_bias(12, 0, None, None, torch.device("cpu"))
    g = torch.randn(2, 8, 12, 16).bfloat16()
    torch.autograd.backward(attend(q, k, v, bias, implementation="sdpa"), g)
    fast_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.autograd.backward(sdpa, g)
    for fast, slow in zip(fast_grads, (q.grad, k.grad, v.grad)):
        assert (fast.float() - slow.float()).abs().max() <= 3e-2 * slow.float().abs().max()

    calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or real_sdpa(*a, **kw))
    expected = attention.eager_attention(q, k, v, bias)
    assert torch.equal(attend(q, k, v, bias, implementation="sdpa"), expected) and not calls
    with torch.no_grad():  # evaluation and generation keep SDPA
        attend(q, k, v, bias, implementation="sdpa")
    assert len(calls) == 1
    attend(q.float(), k.float(), v.float(), bias, implementation="sdpa")  # float32 keeps SDPA
    assert len(calls) == 2
    attend(q.half(), k.half(), v.half(), bias, implementation="sdpa")  # fp16 too (eager is slower there)
    assert len(calls) == 3
    n = attention.EAGER_CPU_HALF_TRAINING_MAX_KEYS + 1  # long keys: SDPA is the faster one
    q, k, v = (t.bfloat16().requires_grad_() for t in qkv(batch=1, heads=2, kv_heads=2, q_len=n, k_len=n))
    attend(q, k, v, attention_bias(n, 0, None, None, torch.device("cpu")), implementation="sdpa")
    assert len(calls) == 4


def test_module_paths_agree_with_dropout_off_and_reject_bad_settings():
    torch.manual_seed(0)
    fast = CausalSelfAttention(32, 4, 2, implementation="sdpa").eval()
    slow = CausalSelfAttention(32, 4, 2, implementation="eager").eval()
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(2, 7, 32)
    mask = left_padding_mask([7, 3], 7)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    rotary = RotaryEmbedding(8).rotary_for(positions)
    bias = attention_bias(7, 0, mask, 4, x.device)
    assert (fast(x, bias, rotary=rotary) - slow(x, bias, rotary=rotary)).abs().max() <= 1e-5
    with pytest.raises(SLMError, match="implementation"):
        CausalSelfAttention(32, 4, implementation="flash3")
    with pytest.raises(SLMError, match="multiple"):
        CausalSelfAttention(32, 4, 3)


def test_rotation_is_bit_identical_to_rotate_half():
    rope = RotaryEmbedding(16, theta=500.0)
    q, k = torch.randn(2, 3, 5, 16), torch.randn(2, 1, 5, 16)
    positions = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]])
    rq, rk = rope(q, k, positions)
    inv_freq = 1.0 / (500.0 ** (torch.arange(0, 16, 2).float() / 16))
    angles = positions[..., None].float() * inv_freq
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]

    def rotate_half(x):
        first, second = x.chunk(2, dim=-1)
        return torch.cat((-second, first), dim=-1)
    assert torch.equal(rq, q * cos + rotate_half(q) * sin)
    assert torch.equal(rk, k * cos + rotate_half(k) * sin)
    rope(q, k, torch.arange(1000)[None, :5] + 995)  # the table grows past its first size
    assert rope.cos_sin(positions)[0].shape == (2, 5, 16)


def test_ring_cache_keeps_the_newest_window_and_reports_positions():
    window, steps = 4, 11
    cache = KVCache(2, 1, 1, 2, 32, torch.float32, "cpu", windows=[None, window])
    assert [k.shape[2] for k in cache.keys] == [32, window]
    prefill = torch.arange(6.0).view(1, 1, 6, 1).expand(1, 1, 6, 2)
    keys, _ = cache.update(1, prefill, prefill)
    assert keys[0, 0, :, 0].tolist() == [0, 1, 2, 3, 4, 5]  # a long prefill sees all of itself
    cache.advance(6)
    for pos in range(6, steps):
        expected_positions = cache.key_positions(1, 1)
        new = torch.full((1, 1, 1, 2), float(pos))
        keys, _ = cache.update(1, new, new)
        cache.advance(1)
        assert keys[0, 0, :, 0].tolist() == expected_positions.float().tolist()
        assert sorted(expected_positions.tolist()) == list(range(pos - window + 1, pos + 1))
    chunk = torch.arange(11.0, 14.0).view(1, 1, 3, 1).expand(1, 1, 3, 2)
    positions = cache.key_positions(1, 3)
    keys, _ = cache.update(1, chunk, chunk)
    assert keys[0, 0, :, 0].tolist() == positions.float().tolist()
    assert positions.tolist()[-3:] == [11, 12, 13]
    with pytest.raises(SLMError, match="one per layer"):
        KVCache(2, 1, 1, 2, 8, torch.float32, "cpu", windows=[None])
