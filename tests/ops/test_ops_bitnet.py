"""BitNet quantisers, BitLinear (fake-quant and frozen), packing, activations, norm gate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from simplified_slm.errors import SLMError
from simplified_slm.layers.bitlinear import BitLinear
from simplified_slm.layers.fused_norm_gate import FusedRMSNormSwishGate
from simplified_slm.ops.activations import swiglu, swish
from simplified_slm.ops.bitnet import (
    activation_quant,
    activation_quant_int8,
    straight_through,
    ternary_codes,
    weight_quant,
)
from simplified_slm.ops.packing import pack_ternary, pack_ternary_hf, unpack_ternary, unpack_ternary_hf


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _ternary(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(-1, 2, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


def test_weight_quant_is_ternary_times_scale_as_in_the_seed():
    w = _randn(64, 48)
    scale = 1.0 / w.abs().mean().clamp(min=1e-5)
    q = weight_quant(w)
    assert torch.equal(q, (w * scale).round().clamp(-1, 1) / scale)
    assert set(q.unique().tolist()) == set((torch.tensor([-1.0, 0.0, 1.0]) / scale).tolist())


def test_weight_quant_of_zero_weights_stays_finite():
    assert torch.equal(weight_quant(torch.zeros(4, 4)), torch.zeros(4, 4))


def test_codes_and_scale_round_trip_exactly_where_requantising_shrinks():
    w = _randn(32, 40)
    codes, scale = ternary_codes(w)
    assert codes.dtype == torch.int8 and set(codes.unique().tolist()) <= {-1, 0, 1}
    dequant = codes.float() / scale
    assert torch.equal(dequant, weight_quant(w))
    # Storing codes + scale survives packing unchanged...
    restored = unpack_ternary(pack_ternary(codes), codes.shape).float() / scale
    assert torch.equal(restored, weight_quant(w))
    # ...whereas re-deriving the scale from the dequantised tensor (the reference's
    # export path) shrinks every weight by the fraction of non-zero codes.
    _, rescale = ternary_codes(dequant)
    nonzero = (codes != 0).float().mean()
    assert rescale > scale
    torch.testing.assert_close(scale / rescale, nonzero)
    assert not torch.equal(weight_quant(dequant), dequant)


def test_straight_through_gradient_is_identity():
    w = _randn(8, 16).requires_grad_()
    x = _randn(3, 16, seed=1).requires_grad_()
    out_w = straight_through(w, weight_quant(w))
    out_x = straight_through(x, activation_quant(x))
    torch.testing.assert_close(out_w, weight_quant(w))
    upstream_w, upstream_x = _randn(8, 16, seed=2), _randn(3, 16, seed=3)
    torch.autograd.backward([out_w, out_x], [upstream_w, upstream_x])
    assert torch.equal(w.grad, upstream_w) and torch.equal(x.grad, upstream_x)


def test_activation_quant_is_per_token_8bit():
    x = _randn(5, 1000) * torch.tensor([[0.01], [1.0], [100.0], [3.0], [0.5]])
    q = activation_quant(x)
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True)
    for row, s in zip(q, scale):
        levels = (row * s).round()
        assert row.unique().numel() <= 256
        assert levels.min() >= -128 and levels.max() <= 127
        torch.testing.assert_close(row * s, levels)
    # each token uses its own range: the max |x| of every row maps to level 127
    torch.testing.assert_close((q * scale).abs().amax(dim=-1), torch.full((5,), 127.0))


def test_activation_quant_int8_matches_fake_quant():
    x = _randn(4, 7, 33)
    levels, scale = activation_quant_int8(x)
    assert levels.dtype == torch.int8 and scale.shape == (4, 7, 1)
    assert torch.equal(levels.float() / scale, activation_quant(x))


def test_bitlinear_forward_shape_and_gradients():
    layer = BitLinear(24, 10)
    assert layer.bias is None
    y = layer(_randn(2, 5, 24))
    assert y.shape == (2, 5, 10)
    y.square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert layer.norm.weight.grad is not None and layer.norm.weight.grad.abs().sum() > 0


def test_bitlinear_matches_reference_formula():
    layer = BitLinear(16, 8, input_norm=False)
    x = _randn(3, 16)
    torch.testing.assert_close(layer(x), F.linear(activation_quant(x), weight_quant(layer.weight)))
    assert layer.norm is None


def test_bitlinear_is_the_integer_formula_of_transformers_packed_bitlinear():
    """y = F.linear(levels, codes) / (weight_scale * input_scale), transformers' order."""
    layer = BitLinear(40, 12, input_norm=False)
    x = _randn(2, 5, 40)
    levels, x_scale = activation_quant_int8(x)
    codes, w_scale = ternary_codes(layer.weight.detach())
    want = F.linear(levels.float(), codes.float()) / (w_scale.reshape(1) * x_scale)
    assert torch.equal(layer(x), want)


def test_bitlinear_gradients_equal_the_seeds_straight_through_formula():
    torch.manual_seed(0)
    layer = BitLinear(32, 16, input_norm=False)
    x = _randn(4, 32).requires_grad_()
    upstream = _randn(4, 16, seed=1)
    layer(x).backward(upstream)
    w = layer.weight.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    F.linear(straight_through(x_ref, activation_quant(x_ref)), straight_through(w, weight_quant(w))).backward(upstream)
    torch.testing.assert_close(layer.weight.grad, w.grad)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_quantize_input_and_dense_weight_split_the_layer():
    layer = BitLinear(24, 8)
    x = _randn(3, 24)
    with torch.no_grad():
        split = F.linear(layer.quantize_input(x), layer.dense_weight())
        torch.testing.assert_close(split, layer(x))
        assert layer.dense_weight() is layer.dense_weight()  # cached without autograd
        layer.freeze(int8=True)
        torch.testing.assert_close(F.linear(layer.quantize_input(x), layer.dense_weight()), split)


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("input_norm", [True, False])
def test_frozen_equals_fake_quant(int8, bias, input_norm):
    torch.manual_seed(0)
    layer = BitLinear(72, 40, bias=bias, input_norm=input_norm).eval()
    x = _randn(3, 9, 72, seed=5)
    with torch.no_grad():
        want = layer(x)
        layer.freeze(int8=int8)
        got = layer(x)
    assert layer.frozen and layer.weight is None
    assert layer.weight_codes.dtype == torch.int8
    assert set(layer.weight_codes.unique().tolist()) <= {-1, 0, 1}
    assert torch.equal(got, want)  # integer sums are exact in float32; the division is shared


def test_frozen_int8_handles_single_token_and_odd_sizes():
    layer = BitLinear(7, 5).eval()
    x = _randn(1, 7, seed=6)
    with torch.no_grad():
        want = layer(x)
        layer.freeze(int8=True)
        got = layer(x)
    assert torch.equal(got, want)


def test_frozen_state_dict_holds_codes_and_scale():
    layer = BitLinear(16, 8)
    layer.freeze()
    state = layer.state_dict()
    assert "weight" not in state and state["weight_codes"].dtype == torch.int8
    fresh = BitLinear(16, 8)
    fresh.freeze()
    fresh.load_state_dict(state)
    x = _randn(2, 16)
    assert torch.equal(fresh(x), layer(x))


def test_bitlinear_wrong_input_size_raises():
    with pytest.raises(SLMError, match="last dim 8"):
        BitLinear(8, 4)(torch.zeros(2, 9))


@pytest.mark.parametrize("shape", [(1,), (3,), (4,), (5, 7), (2, 3, 5), (64, 33)])
def test_pack_ternary_round_trip(shape):
    codes = _ternary(*shape)
    packed = pack_ternary(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-codes.numel() // 4)
    assert torch.equal(unpack_ternary(packed, codes.shape), codes)


def test_pack_ternary_layout():
    # codes 4j..4j+3 of byte j sit in bits 0-1, 2-3, 4-5, 6-7, stored as code + 1
    codes = torch.tensor([-1, 0, 1, 1, 0], dtype=torch.int8)
    assert pack_ternary(codes).tolist() == [0b10100100, 0b00000001]


@pytest.mark.parametrize("shape", [(4, 3), (8, 5), (64, 33), (5, 2), (1, 3), (6,), (7, 2, 3)])
def test_pack_ternary_hf_round_trip(shape):
    codes = _ternary(*shape)
    packed = pack_ternary_hf(codes)
    assert packed.shape == (-(-shape[0] // 4), *shape[1:]) and packed.dtype == torch.uint8
    assert torch.equal(unpack_ternary_hf(packed, shape[0]), codes)


def test_pack_ternary_hf_matches_transformers_layout():
    # The worked example in transformers' integrations/bitnet.py `unpack_weights` docstring.
    packed = torch.tensor([[0b10100001, 0b00011000], [0b10010000, 0b00001010]], dtype=torch.uint8)
    codes = torch.tensor(
        [[0, -1], [-1, 1], [-1, 1], [-1, 1], [1, 0], [0, -1], [1, -1], [1, -1]], dtype=torch.int8
    )
    assert torch.equal(unpack_ternary_hf(packed), codes)
    assert torch.equal(pack_ternary_hf(codes), packed)


def test_packing_rejects_bad_input():
    with pytest.raises(SLMError, match="outside"):
        pack_ternary(torch.tensor([2], dtype=torch.int8))
    with pytest.raises(SLMError, match="integer codes"):
        pack_ternary_hf(torch.zeros(4, 2))
    with pytest.raises(SLMError, match="bytes"):
        unpack_ternary(torch.zeros(2, dtype=torch.uint8), (3, 4))
    with pytest.raises(SLMError, match="out_features"):
        unpack_ternary_hf(torch.zeros(2, 3, dtype=torch.uint8), 9)


def test_swish_and_swiglu():
    x, y = _randn(10), _randn(10, seed=1)
    torch.testing.assert_close(swish(x), x * torch.sigmoid(x))
    torch.testing.assert_close(swiglu(x, y), x * torch.sigmoid(x) * y)


def test_fused_rmsnorm_swish_gate():
    norm = FusedRMSNormSwishGate(12, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(_randn(12, seed=2))
    x, g = _randn(3, 12), _randn(3, 12, seed=1)
    rms = x.square().mean(-1, keepdim=True).add(1e-6).rsqrt()
    torch.testing.assert_close(norm(x, g), x * rms * norm.weight * g * torch.sigmoid(g))
