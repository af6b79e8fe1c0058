"""Decoding quantized models: the compiled step equals eager for every scheme, and a bf16
KV cache halves the cache while attention computes as before."""

import pytest
import torch

from simplified_slm.errors import SLMError
from simplified_slm.layers.quantized import QuantizedLinear
from simplified_slm.models import LlamaConfig, LlamaForCausalLM
from simplified_slm.models.registry import build_model


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig.preset("tiny", intermediate_size=128)).eval()


def every_scheme_model() -> LlamaForCausalLM:
    """One model holding every scheme (one compile covers them all): each projection of
    each layer gets the next scheme in turn, the tied head / embedding q4_1."""
    model = tiny_llama().quantize("q4_1", skip=["layers.*"])
    schemes = ["q8_0", "q4_0", "q4_1", "bf16", "fp16"]
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for i, (name, linear) in enumerate(linears):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child,
                QuantizedLinear.from_linear(linear, schemes[i % len(schemes)], group_size=(32, 64)[i % 2]))
    assert {m.scheme for m in model.modules() if isinstance(m, QuantizedLinear)} == set(schemes)
    return model


def test_compiled_decode_equals_eager_for_every_scheme():
    model = every_scheme_model()
    ids = torch.randint(0, 256, (1, 6))
    eager = model.generate(ids, 12, greedy=True)
    try:
        compiled = model.generate(ids, 12, greedy=True, compile=True)
    finally:
        # dynamo remembers per function that lengths varied (the growing cache) and would
        # trace later compiles of the same forward with symbolic lengths
        torch._dynamo.reset()
    assert torch.equal(compiled, eager)


def test_bf16_kv_cache_halves_the_cache():
    model = tiny_llama().quantize("int8")
    ids = torch.randint(0, 256, (2, 7))
    caches = {}

    def make_cache(batch_size, max_length, _make=model.make_cache):
        cache = caches.setdefault(len(caches), _make(batch_size, max_length))
        return cache
    model.make_cache = make_cache
    fp32 = model.generate(ids, 10, greedy=True)
    bf16 = model.generate(ids, 10, greedy=True, kv_cache_dtype="bf16")
    assert caches[1].keys[0].dtype == torch.bfloat16 and caches[1].nbytes() * 2 == caches[0].nbytes()
    assert (bf16 == fp32).float().mean() > 0.9  # rounding keys may flip a near tie, rarely
    with torch.no_grad():  # the logits of one step through each cache agree to bf16 precision
        full = model(ids[:, :5], cache=model.make_cache(2, 8))
        half = model(ids[:, :5], cache=model.make_cache(2, 8).to_dtype(torch.bfloat16))
    assert (full.logits - half.logits).abs().max() < 0.05


def test_kv_cache_dtype_errors():
    ids = torch.randint(0, 256, (1, 4))
    with pytest.raises(SLMError, match="unknown KV cache dtype 'int8'"):
        tiny_llama().generate(ids, 2, kv_cache_dtype="int8")
    hgrn = build_model({"family": "hgrn_bit", "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 1})
    with pytest.raises(SLMError, match="kv_cache_dtype applies to transformer KV caches"):
        hgrn.generate(ids, 2, kv_cache_dtype="bf16")
