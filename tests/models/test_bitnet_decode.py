"""Fast int8 decoding of BitNet: stacked sibling projections and the compiled decode step.

Every speed path must give what the fake-quant model gives: bit-identical logits for the
stacked int8 matmuls, the same greedy tokens for cached and compiled decoding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from simplified_slm.layers.bitlinear import BitLinear, sibling_projections
from simplified_slm.models.bitnet import BitNetConfig, BitNetForCausalLM


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _siblings(seed: int = 0, sizes: tuple[int, ...] = (24, 8, 8), in_features: int = 40) -> list[BitLinear]:
    torch.manual_seed(seed)
    return [BitLinear(in_features, n, input_norm=False).eval() for n in sizes]


def _tiny(seed: int = 0, **overrides) -> BitNetForCausalLM:
    torch.manual_seed(seed)
    return BitNetForCausalLM(BitNetConfig.preset("tiny", vocab_size=100, **overrides)).eval()


@pytest.mark.parametrize("shape", [(1, 1, 40), (2, 7, 40), (5, 40)])
def test_stacked_int8_siblings_equal_each_layer_and_the_fake_quant_forward(shape):
    layers = _siblings()
    x = _randn(*shape, seed=1)
    with torch.no_grad():
        fake = [layer(x) for layer in layers]
        for layer in layers:
            layer.freeze(int8=True)
        separate = [layer(x) for layer in layers]
        stacked = sibling_projections(x, layers)
        after = [layer(x) for layer in layers]  # each layer alone, now reading a view of the stack
    assert layers[0]._stack is not None
    for want, got_a, got_b, got_c in zip(fake, separate, stacked, after):
        assert got_b.shape == want.shape
        assert torch.equal(got_a, want) and torch.equal(got_b, want) and torch.equal(got_c, want)


def test_the_stack_costs_no_memory_and_follows_new_weights():
    layers, donors = _siblings(0), _siblings(1)
    x = _randn(3, 40, seed=2)
    with torch.no_grad():
        for layer in (*layers, *donors):
            layer.freeze(int8=True)
        sibling_projections(x, layers)
        stack = layers[0]._stack
        # the layers' own buffers are views of the stacked codes, not a second copy
        assert all(layer.weight_codes.untyped_storage().data_ptr() == stack.codes.untyped_storage().data_ptr()
                   for layer in layers)
        shapes = {k: v.shape for k, v in layers[1].state_dict().items()}
        for layer, donor in zip(layers, donors):
            layer.load_state_dict(donor.state_dict())  # copies into the views: the stack must be rebuilt
        assert {k: v.shape for k, v in layers[1].state_dict().items()} == shapes
        got = sibling_projections(x, layers)
        assert layers[0]._stack is not stack
        assert all(torch.equal(g, donor(x)) for g, donor in zip(got, donors))


def test_stacked_state_dict_saves_and_loads_with_safetensors(tmp_path):
    model = _tiny().freeze_ternary(int8=True)
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        want = model(ids).logits  # builds the stacks, so the code buffers are views now
    save_file({k: v.contiguous() for k, v in model.state_dict().items()
               if k != "lm_head.weight"}, str(tmp_path / "m.safetensors"))  # lm_head is tied
    fresh = _tiny(seed=1).freeze_ternary(int8=True)
    fresh.load_state_dict(load_file(str(tmp_path / "m.safetensors")), strict=False)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, want)


def test_layers_that_cannot_share_one_matmul_run_one_by_one():
    x = _randn(2, 40, seed=3)
    torch.manual_seed(0)
    linears = [nn.Linear(40, 8), nn.Linear(40, 4)]
    normed = [BitLinear(40, 8), BitLinear(40, 4)]  # each its own input norm: different inputs
    for layer in normed:
        layer.freeze(int8=True)
    fake = _siblings()
    with torch.no_grad():
        for group in (linears, normed, fake):
            assert all(torch.equal(g, layer(x)) for g, layer in zip(sibling_projections(x, group), group))
    assert normed[0]._stack is None and fake[0]._stack is None
    frozen = _siblings()
    for layer in frozen:
        layer.freeze(int8=True)
    sibling_projections(x, frozen)  # autograd on: no stack (and no view rebinding) during training code
    assert frozen[0]._stack is None


@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_int8_model_decodes_the_fake_quant_tokens_with_and_without_cache(attention):
    fake = _tiny(attention="mla", kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                 num_key_value_heads=None) if attention == "mla" else _tiny()
    packed = copy.deepcopy(fake).freeze_ternary(int8=True)
    prompt = torch.randint(0, 100, (2, 6))
    with torch.no_grad():
        assert torch.equal(packed(prompt).logits, fake(prompt).logits)
    tokens = packed.generate(prompt, 16, greedy=True)
    assert torch.equal(tokens, fake.generate(prompt, 16, greedy=True))
    assert torch.equal(tokens, packed.generate(prompt, 16, greedy=True, use_cache=False))


@pytest.mark.parametrize("act", ["silu", "relu2"])
def test_stacked_int8_model_prefill_equals_fake_quant_bit_for_bit(act):
    """Several seeds and a long prompt: the stacked parts must reach later ops laid out as
    separate outputs would be (a strided gate took SiLU's scalar loop: last-bit changes
    that an activation rounding boundary turns into different logits in ~40% of models)."""
    for seed in range(6):
        fake = _tiny(seed, hidden_act=act)
        packed = copy.deepcopy(fake).freeze_ternary(int8=True)
        ids = torch.randint(0, 100, (3, 40))
        with torch.no_grad():
            assert torch.equal(packed(ids).logits, fake(ids).logits), f"seed {seed}"


def test_int8_layers_compile_without_graph_breaks_and_match_eager():
    """fullgraph: any graph break raises. Also a regression test: inductor gave CPU
    `_int_mm` a (1, K) int8 view with row stride 0 (torch 2.13), which it misreads; the
    int8 path must quantise an already flattened input."""
    layers, single = _siblings(), BitLinear(40, 16, input_norm=False).eval()
    for layer in (*layers, single):
        layer.freeze(int8=True)
    x = _randn(1, 1, 40, seed=4)

    def step(t: torch.Tensor) -> list[torch.Tensor]:
        return [*sibling_projections(t, layers), single(t)]

    with torch.no_grad():
        want = step(x)  # eager: builds the stack the compiled step reads
        got = torch.compile(step, fullgraph=True)(x)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.slow
@pytest.mark.parametrize("int8", [False, True])
def test_compiled_decode_gives_the_eager_tokens_and_sees_new_weights(int8):
    model, donor = _tiny(0), _tiny(1)
    if int8:
        model.freeze_ternary(int8=True)
        donor.freeze_ternary(int8=True)
    prompt = torch.randint(0, 100, (1, 9))
    cache = model.make_cache(1, 10)
    with torch.no_grad():  # the whole decode step is one graph (a break would raise)
        model(prompt, cache=cache)
        torch.compile(model, fullgraph=True)(prompt[:, :1], cache=cache)
    assert torch.equal(model.generate(prompt, 12, greedy=True, compile=True), model.generate(prompt, 12, greedy=True))
    # the compiled step reads the caches the eager prompt pass refreshes: new weights count
    model.load_state_dict(donor.state_dict())
    assert torch.equal(model.generate(prompt, 12, greedy=True, compile=True), donor.generate(prompt, 12, greedy=True))


def test_stacks_made_in_inference_mode_leave_normal_buffers():
    layers, donors = _siblings(0), _siblings(1)
    for layer in (*layers, *donors):
        layer.freeze(int8=True)
    x = _randn(2, 40, seed=5)
    with torch.inference_mode():
        sibling_projections(x, layers)
    assert layers[0]._stack is not None and not layers[0].weight_codes.is_inference()
    for layer, donor in zip(layers, donors):
        layer.load_state_dict(donor.state_dict())  # would fail on inference tensors
    with torch.inference_mode():
        assert all(torch.equal(g, donor(x)) for g, donor in zip(sibling_projections(x, layers), donors))
    with torch.inference_mode():  # frozen inside inference mode: runs, one layer at a time
        frozen = _siblings(0)
        for layer in frozen:
            layer.freeze(int8=True)
        got = sibling_projections(x, frozen)
    assert frozen[0]._stack is None
    reference = _siblings(0)
    with torch.no_grad():
        assert all(torch.equal(g, layer(x)) for g, layer in zip(got, reference))
