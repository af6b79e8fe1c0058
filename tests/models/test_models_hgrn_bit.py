"""hgrn_bit (the original reference API's SimplifiedSLMForCausalLM): interface, cache, causality, ternary freeze."""

import pytest
import torch

from conftest import family_model
from simplified_slm.layers.bitlinear import BitLinear
from simplified_slm.layers.hgrn_bit import HGRNBitAttention
from simplified_slm.models import CausalLM, SimplifiedSLMConfig, SimplifiedSLMForCausalLM
from simplified_slm.utils import ByteTokenizer


@pytest.fixture
def model():
    return family_model("hgrn_bit")


def test_seed_quick_start_runs_as_written():
    config = SimplifiedSLMConfig(vocab_size=256, hidden_size=512, num_hidden_layers=6, num_heads=1)
    model = SimplifiedSLMForCausalLM(config)
    tokenizer = ByteTokenizer()
    encoded = tokenizer.encode(["Hello world"])[0]["input_ids"]
    input_ids = torch.tensor([encoded.tolist()])
    output = model.generate(input_ids, max_new_tokens=50)
    assert output.shape == (1, 11 + 50)
    assert tokenizer.decode(output[0].tolist()).startswith("Hello world")


def test_presets_and_parameter_counts():
    counts = {p: SimplifiedSLMForCausalLM(SimplifiedSLMConfig.preset(p)).num_parameters()
              for p in ("small", "base", "large")}
    assert counts == {"small": 3_552_768, "base": 20_750_336, "large": 85_446_144}
    assert SimplifiedSLMConfig.small().hidden_size == 256 and SimplifiedSLMConfig.large().num_hidden_layers == 12


def test_all_linears_are_ternary(model):
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, BitLinear) for m in linears)


def test_cached_greedy_equals_full_recomputation(model):
    prompt = torch.randint(0, 256, (2, 9))
    assert torch.equal(model.generate(prompt, 40, greedy=True), model.generate(prompt, 40, greedy=True, use_cache=False))
    cache = model.make_cache(2, 0)
    full = model(torch.cat([prompt, prompt[:, :3]], 1)).logits
    model(prompt, cache=cache)
    for t in range(3):  # stepping the cache reproduces the full forward's logits
        step = model(prompt[:, t:t + 1], cache=cache).logits[:, 0]
        assert torch.allclose(step, full[:, 9 + t], atol=1e-4)
    assert cache.length == 12


def test_lower_bounds_start_at_zero_and_grow(model):
    bounds = model.layer_lower_bounds()
    assert torch.equal(bounds[0], torch.zeros_like(bounds[0]))
    assert all(bool((hi >= lo).all()) for lo, hi in zip(bounds, bounds[1:]))


def test_output_gate_normalises_the_state():
    """HGRN's choice: o = rmsnorm(h) * swish(g), so scaling the state leaves the output unchanged."""
    torch.manual_seed(0)
    layer = HGRNBitAttention(32)
    h, g = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    assert torch.allclose(layer.g_norm(h, g), layer.g_norm(h * 50.0, g), atol=1e-5)
    assert not torch.allclose(layer.g_norm(h, g), layer.g_norm(h, g * 50.0), atol=1e-3)


@pytest.mark.parametrize("int8", [False, True])
def test_freeze_ternary_matches_fake_quant(model, int8, tmp_path):
    ids = torch.randint(0, 256, (2, 20))
    reference = model(ids).logits
    model.save_pretrained(tmp_path)
    frozen = CausalLM.from_pretrained(tmp_path).eval().freeze_ternary(int8=int8)
    out = frozen(ids).logits
    assert torch.allclose(out, reference, atol=1e-4, rtol=1e-4)
    assert all(m.weight is None for m in frozen.modules() if isinstance(m, BitLinear))


def test_save_load_bit_exact(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = CausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, SimplifiedSLMForCausalLM)
    ids = torch.randint(0, 256, (1, 16))
    assert torch.equal(model(ids).logits, loaded.eval()(ids).logits)
