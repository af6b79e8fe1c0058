"""llama family: RoPE scalings, GQA/MQA/MHA, sliding window, cache, presets."""

import math

import pytest
import torch

from simplified_slm import SLMError
from simplified_slm.layers.rope import RotaryEmbedding, rope_inverse_frequencies
from simplified_slm.models import CausalLM, config_from_dict
from simplified_slm.models.llama import LLAMA3_ROPE, LlamaConfig, LlamaForCausalLM


def tiny(**kw):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig.preset("tiny", vocab_size=97, **kw)).eval()


def test_llama_3_2_1b_preset_has_1_23b_parameters():
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig.preset("llama-3.2-1b"))
    assert model.num_parameters() == 1_235_814_400


def test_llama3_frequencies_follow_the_published_rule():
    base = rope_inverse_frequencies(64, 500000.0)
    scaled = rope_inverse_frequencies(64, 500000.0, LLAMA3_ROPE)
    wavelen = 2 * math.pi / base
    high, low = 8192 / 4.0, 8192 / 1.0
    assert torch.equal(scaled[wavelen < high], base[wavelen < high])           # short: unchanged
    assert torch.allclose(scaled[wavelen > low], base[wavelen > low] / 32.0)   # long: / factor
    mid = (wavelen >= high) & (wavelen <= low)
    assert mid.any()
    assert ((scaled[mid] <= base[mid]) & (scaled[mid] >= base[mid] / 32.0)).all()


def test_linear_and_dynamic_scaling():
    base = rope_inverse_frequencies(32, 10000.0)
    assert torch.allclose(rope_inverse_frequencies(32, 10000.0, {"rope_type": "linear", "factor": 4.0}), base / 4)
    dyn = {"rope_type": "dynamic", "factor": 2.0}
    assert torch.equal(rope_inverse_frequencies(32, 10000.0, dyn, 128, seq_len=100), base)  # within context
    longer = rope_inverse_frequencies(32, 10000.0, dyn, 128, seq_len=512)
    assert (longer[1:] < base[1:]).all()  # larger base -> lower frequencies beyond the context


def test_rotation_preserves_norms_and_relative_positions():
    rope = RotaryEmbedding(16)
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    dots = []
    for shift in (0, 5, 40):
        rq, _ = rope(q, k, torch.tensor([[3 + shift]]))
        _, rk = rope(q, k, torch.tensor([[1 + shift]]))
        dots.append((rq * rk).sum())
        assert torch.allclose(rq.norm(), q.norm(), atol=1e-5)
    assert torch.allclose(dots[0], dots[1], atol=1e-4) and torch.allclose(dots[0], dots[2], atol=1e-4)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_gqa_variants_cache_equivalence(kv_heads):
    model = tiny(num_key_value_heads=kv_heads)
    prompt = torch.randint(0, 97, (2, 7))
    assert torch.equal(model.generate(prompt, 25, greedy=True), model.generate(prompt, 25, greedy=True, use_cache=False))


def test_sliding_window_limits_attention():
    model = tiny(sliding_window=4)
    ids = torch.randint(0, 97, (1, 20))
    changed = ids.clone()
    changed[0, 2] = (ids[0, 2] + 1) % 97
    a, b = model(ids).logits, model(changed).logits
    # with 2 layers and window 4, position 2 reaches at most position 2 + 2 * 3 = 8
    assert not torch.allclose(a[0, 2:9], b[0, 2:9])
    assert torch.allclose(a[0, 9:], b[0, 9:], atol=1e-6)
    prompt = ids[:, :6]
    assert torch.equal(model.generate(prompt, 20, greedy=True), model.generate(prompt, 20, greedy=True, use_cache=False))


def test_save_load(tmp_path):
    # left padding is in the family contract (tests/models/test_family_contract.py)
    model = tiny()
    a = torch.randint(0, 97, (1, 9))
    model.save_pretrained(tmp_path)
    loaded = CausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(a).logits, model(a).logits)


def test_config_errors():
    with pytest.raises(SLMError, match="num_key_value_heads"):
        LlamaConfig(num_attention_heads=8, num_key_value_heads=3)
    with pytest.raises(SLMError, match="rope_type"):
        config_from_dict({"family": "llama", "rope_scaling": {"rope_type": "yarnish", "factor": 2}})
    with pytest.raises(SLMError, match="needs"):
        config_from_dict({"family": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8}})


# --- per-layer sliding windows, bounded cache, attention implementations ----------------

def test_layer_windows_follow_transformers_names():
    base = dict(num_hidden_layers=6, num_attention_heads=4, hidden_size=32, intermediate_size=64)
    assert LlamaConfig(**base, sliding_window=8).layer_windows == [8] * 6  # Mistral: every layer
    assert LlamaConfig(**base, sliding_window=8, sliding_window_pattern=3).layer_windows == [8, 8, None] * 2
    types = ["full_attention", "sliding_attention"] * 3  # Qwen 3 / Gemma 3 `layer_types`
    assert LlamaConfig(**base, sliding_window=8, layer_types=types).layer_windows == [None, 8] * 3
    assert LlamaConfig(**base, sliding_window=[2, None, 4, 4, None, 16]).layer_windows == [2, None, 4, 4, None, 16]
    assert LlamaConfig(**base, layer_types=["full_attention"] * 6).layer_windows == [None] * 6
    cfg = LlamaConfig(**base, sliding_window=[2, None, 4, 4, None, 16])
    assert LlamaConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("bad, match", [
    (dict(sliding_window=0), "positive"),
    (dict(sliding_window=[4, 4]), "one window per layer"),
    (dict(sliding_window=[4, None, 0, 4, 4, 4]), "positive"),
    (dict(sliding_window=[4] * 6, sliding_window_pattern=2), "drop layer_types"),
    (dict(sliding_window=4, layer_types=["sliding_attention"] * 5), "one entry per layer"),
    (dict(sliding_window=4, layer_types=["local"] * 6), "not one of"),
    (dict(layer_types=["sliding_attention"] * 6), "set the window size"),
    (dict(sliding_window_pattern=2), "needs the window size"),
    (dict(sliding_window=4, sliding_window_pattern=0), "positive"),
    (dict(sliding_window=4, sliding_window_pattern=2, layer_types=["full_attention"] * 6), "not both"),
    (dict(attn_implementation="flash"), "not allowed"),
])
def test_window_config_errors(bad, match):
    with pytest.raises(SLMError, match=match):
        LlamaConfig(num_hidden_layers=6, num_attention_heads=4, hidden_size=32, intermediate_size=64, **bad)


def mixed_windows(**kw):
    """4 layers: windows 4, global, 6, 4 (one full layer, two window sizes)."""
    torch.manual_seed(0)
    cfg = LlamaConfig.preset("tiny", vocab_size=97, num_hidden_layers=4, sliding_window=[4, None, 6, 4], **kw)
    return LlamaForCausalLM(cfg).eval()


def test_windowed_layers_keep_a_bounded_cache():
    model = mixed_windows()
    cache = model.make_cache(2, 200)
    assert [k.shape[2] for k in cache.keys] == [4, 200, 6, 4]
    before = cache.nbytes()
    model(torch.randint(0, 97, (2, 30)), cache=cache)
    for _ in range(20):
        model(torch.randint(0, 97, (2, 1)), cache=cache)
    assert cache.nbytes() == before and cache.length == 50


@pytest.mark.parametrize("prompt_len", [3, 11], ids=["prefill-inside-window", "prefill-longer-than-window"])
def test_bounded_cache_generation_equals_full_mask_reference(prompt_len):
    model = mixed_windows()
    prompt = torch.randint(0, 97, (1, prompt_len))
    cached = model.generate(prompt, 20, greedy=True)
    assert torch.equal(cached, model.generate(prompt, 20, greedy=True, use_cache=False))
    # teacher-forced logits: the uncached forward with the sliding-window masks is the reference
    seq = cached
    full = model(seq).logits
    cache = model.make_cache(1, seq.shape[1])
    pieces = [model(seq[:, :prompt_len], cache=cache).logits]
    pieces.append(model(seq[:, prompt_len:prompt_len + 5], cache=cache).logits)  # a chunk after a wrap
    pieces += [model(seq[:, t:t + 1], cache=cache).logits for t in range(prompt_len + 5, seq.shape[1])]
    assert (torch.cat(pieces, 1) - full).abs().max() <= 1e-5


def test_bounded_cache_with_left_padding_equals_each_row_alone():
    model = mixed_windows()
    long, short = torch.randint(1, 97, (1, 12)), torch.randint(1, 97, (1, 5))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 7, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :7] = 0
    out = model.generate(batch, 15, greedy=True, attention_mask=mask)
    assert torch.equal(out[0], model.generate(long, 15, greedy=True)[0])
    assert torch.equal(out[1, 7:], model.generate(short, 15, greedy=True)[0])
    assert torch.equal(out, model.generate(batch, 15, greedy=True, attention_mask=mask, use_cache=False))


def test_eager_and_sdpa_models_agree():
    fast, slow = mixed_windows(), mixed_windows(attn_implementation="eager")
    slow.load_state_dict(fast.state_dict())
    ids = torch.randint(1, 97, (2, 14))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    assert (fast(ids, attention_mask=mask).logits - slow(ids, attention_mask=mask).logits).abs().max() <= 1e-5
    assert torch.equal(fast.generate(ids, 10, greedy=True, attention_mask=mask),
                       slow.generate(ids, 10, greedy=True, attention_mask=mask))


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens():
    model = mixed_windows()
    prompt = torch.randint(0, 97, (1, 9))
    assert torch.equal(model.generate(prompt, 12, greedy=True, compile=True), model.generate(prompt, 12, greedy=True))
