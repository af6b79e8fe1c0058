"""Quantized layers and `quantize_model` on real (tiny) models of every float family."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_model, save_model

from simplified_slm.errors import SLMError
from simplified_slm.layers.bitlinear import BitLinear
from simplified_slm.layers.quantized import QuantizedEmbedding, QuantizedLinear, quantize_model
from simplified_slm.ops import quant, quant_native
from tests.conftest import family_model as _family_model


def family_model(family: str, seed: int = 0):
    """The shared tiny models, with an MLP width every group size divides (tiny llama's is 176)."""
    return _family_model(family, seed, **({"intermediate_size": 256} if family == "llama" else {}))

# Relative L2 error of the logits against float32, per scheme, on a tiny random model:
# int8 weights (+ int8 activations in the kernel) stay close, 4-bit stays bounded.
LOGIT_BOUND = {"q8_0": 0.02, "q4_0": 0.25, "q4_1": 0.2, "bf16": 0.01, "fp16": 0.002}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_quantized_linear_equals_its_dequantized_float_linear(scheme, bias):
    torch.manual_seed(0)
    linear = nn.Linear(128, 40, bias=bias)
    layer = QuantizedLinear.from_linear(linear, scheme, 64 if scheme in ("q4_0", "q4_1") else 32)
    float_twin = nn.Linear(128, 40, bias=bias)
    with torch.no_grad():
        float_twin.weight.copy_(layer.dequantized_weight())
        if bias:
            float_twin.bias.copy_(linear.bias)
    x = torch.randn(4, 3, 128)
    # batch 12 runs the int8-activation kernel where it is built: off by activation rounding only
    got, want = layer(x), float_twin(x)
    assert got.shape == want.shape
    assert _rel(got, want) < (1e-5 if scheme in quant.FLOAT_SCHEMES else 0.01)
    # a long batch takes the dequantize + torch.mm path: float32 all the way, so exact
    x = torch.randn(quant_native.SMALL_BATCH + 1, 128)
    torch.testing.assert_close(layer(x), float_twin(x), rtol=1e-5, atol=1e-5)
    assert f"scheme={scheme}" in repr(layer) and f"bias={bias}" in repr(layer)


def test_tied_embedding_and_head_keep_one_packed_copy():
    model = quantize_model(family_model("llama"), "q4_1")
    embed, head = model.embed_tokens, model.lm_head
    assert isinstance(embed, QuantizedEmbedding) and isinstance(head, QuantizedLinear)
    for name in ("codes", "scales", "mins"):
        assert getattr(embed, name) is getattr(head, name)
    ids = torch.tensor([[3, 7, 255]])
    torch.testing.assert_close(embed(ids), head.dequantized_weight()[ids])


def _families_float_parts(family: str) -> list[str]:
    model = family_model(family)
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Embedding)) and not isinstance(m, BitLinear)]


@pytest.mark.parametrize("family", ["llama", "gpt"])
@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_quantize_model_keeps_logits_close(family, scheme):
    model = family_model(family)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        quantize_model(model, scheme)
        got = model(ids).logits
        assert _rel(got, want) < LOGIT_BOUND[scheme]
        one = model(ids[:, :1]).logits  # batch of 2 single tokens: the GEMV path
        assert _rel(one, want[:, :1]) < LOGIT_BOUND[scheme]
    assert not any(isinstance(m, (nn.Linear, nn.Embedding)) for m in model.modules())


@pytest.mark.parametrize("family", ["bitnet", "hgrn_bit"])
def test_bitlinear_is_left_alone(family):
    model = family_model(family)
    bit = [n for n, m in model.named_modules() if isinstance(m, BitLinear)]
    floats = _families_float_parts(family)
    quantize_model(model, "q8_0")
    modules = dict(model.named_modules())
    assert bit and all(isinstance(modules[n], BitLinear) for n in bit)
    assert floats and all(isinstance(modules[n], (QuantizedLinear, QuantizedEmbedding)) for n in floats)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_skip_keeps_layers_in_float_and_odd_shapes_are_refused():
    model = quantize_model(family_model("llama"), "q8_0", skip=["lm_head", "embed_tokens"])
    assert type(model.lm_head) is nn.Linear and type(model.embed_tokens) is nn.Embedding
    with pytest.raises(SLMError, match=r"cannot quantize .*: in_features 48 is not divisible by group size 32"):
        quantize_model(nn.Sequential(nn.Linear(48, 8)), "q4_0")
    with pytest.raises(SLMError, match="group size 256 is not supported"):
        quantize_model(family_model("gpt"), "q4_0", group_size=256)


@pytest.mark.parametrize("scheme", ["q4_1", "bf16"])
def test_state_dict_round_trips_through_safetensors(tmp_path, scheme):
    model = quantize_model(family_model("llama"), scheme)
    save_model(model, str(tmp_path / "model.safetensors"))
    fresh = quantize_model(family_model("llama", seed=3), scheme)
    load_model(fresh, str(tmp_path / "model.safetensors"))
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh.embed_tokens.packed_codes is fresh.lm_head.packed_codes  # the tie survives loading
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(model(ids).logits, fresh(ids).logits)


def test_quantized_model_runs_under_torch_compile():
    # one layer: compiling is the slow part, and one block holds every kind of quantized op
    model = quantize_model(_family_model("llama", 0, num_hidden_layers=1, intermediate_size=256), "q4_0")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model, fullgraph=True)(ids).logits
    # inductor fuses the float ops around the kernel differently, and an activation that moves
    # by one float ulp can round to the next int8 code (in this 64-wide model that moves one
    # token's logits by ~0.5%): close, not bit-identical; a wrong op would be off by ~100%
    assert _rel(got, want) < 0.02


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_gradients_flow_to_the_input(scheme, native, monkeypatch):
    # adapters trained over a quantized base need d(loss)/dx through the frozen weight: the
    # same output and input gradient as the dequantized float twin, on the C path and the
    # reference, with slices smaller than W so the sliced backward is exercised
    if native and not quant_native._built():
        pytest.skip("no C compiler: the kernel path cannot run here")
    monkeypatch.setattr(quant_native, "_built", lambda: native)
    monkeypatch.setattr(quant_native, "_DEQUANTIZED_SLICE_BYTES", 7 * 64 * 4)
    monkeypatch.setattr(quant, "_REFERENCE_CHUNK", 5 * 64)
    torch.manual_seed(0)
    layer = QuantizedLinear.from_linear(nn.Linear(64, 24, bias=True), scheme)
    twin = nn.Linear(64, 24)
    with torch.no_grad():
        twin.weight.copy_(layer.dequantized_weight())
        twin.bias.copy_(layer.bias)
    x = torch.randn(3, 5, 64, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_(True)
    g = torch.randn(3, 5, 24)
    y = layer(x)
    y.backward(g)
    twin(x_twin).backward(g)
    torch.testing.assert_close(y, twin(x_twin), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_twin.grad, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in layer.parameters())  # W gets no gradient: it is frozen


def test_the_backward_keeps_only_the_packed_weight():
    # what autograd holds between forward and backward: the packed tensors, never W in float32
    layer = QuantizedLinear.from_linear(nn.Linear(256, 512), "q4_0")
    x = torch.randn(4, 256, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    assert saved and all(t.dtype != torch.float32 or t.numel() < 256 * 512 for t in saved)
