"""GPT family: the shared model interface, cache, batching with padding, save/load."""

import json

import pytest
import torch

from simplified_slm import SLMError
from simplified_slm.models import CausalLM, GPTConfig, GPTForCausalLM, build_model, config_from_dict


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(GPTConfig(vocab_size=50, n_layers=2, d_model=32, n_heads=4, context_length=32,
                                 dropout=0.0)).eval()


def test_forward_shapes_and_shifted_loss(model):
    ids = torch.randint(0, 50, (3, 10))
    out = model(ids, labels=ids)
    assert out.logits.shape == (3, 10, 50)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, manual)
    assert out.aux_loss is None


def test_causality(model):
    ids = torch.randint(0, 50, (1, 12))
    changed = ids.clone()
    changed[0, 7] = (ids[0, 7] + 1) % 50
    a, b = model(ids).logits, model(changed).logits
    assert torch.allclose(a[0, :7], b[0, :7], atol=1e-6)
    assert not torch.allclose(a[0, 7:], b[0, 7:])


def test_cached_generation_equals_recomputation(model):
    prompt = torch.randint(0, 50, (2, 5))
    cached = model.generate(prompt, 20, greedy=True)
    uncached = model.generate(prompt, 20, greedy=True, use_cache=False)
    assert torch.equal(cached, uncached)
    # one cached step gives the same logits as the full forward's last row
    cache = model.make_cache(2, 32)
    model(prompt, cache=cache)
    step = model(cached[:, 5:6], cache=cache).logits[:, -1]
    full = model(cached[:, :6]).logits[:, -1]
    assert torch.allclose(step, full, atol=1e-5)


def test_generation_past_context_crops(model):
    out = model.generate(torch.randint(0, 50, (1, 30)), 10, greedy=True)
    assert out.shape == (1, 40)


def test_left_padded_batch_matches_single_prompts(model):
    a = torch.randint(0, 50, (1, 8))
    b = torch.randint(0, 50, (1, 3))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    out = model.generate(batch, 12, greedy=True, attention_mask=mask)
    assert torch.equal(out[0], model.generate(a, 12, greedy=True)[0])
    assert torch.equal(out[1, 5:], model.generate(b, 12, greedy=True)[0])


def test_sampling_is_seeded(model):
    prompt = torch.randint(0, 50, (1, 4))
    a = model.generate(prompt, 15, temperature=1.0, top_k=10, seed=3)
    b = model.generate(prompt, 15, temperature=1.0, top_k=10, seed=3)
    assert torch.equal(a, b)


def test_eos_stops_and_pads(model):
    prompt = torch.randint(0, 50, (1, 4))
    greedy = model.generate(prompt, 10, greedy=True)
    eos = int(greedy[0, 6])
    stopped = model.generate(prompt, 10, greedy=True, eos_token_id=eos)
    assert int(stopped[0, -1]) == eos and stopped.shape[1] <= greedy.shape[1]


def test_prompt_errors(model):
    with pytest.raises(SLMError, match="context"):
        model.generate(torch.zeros(1, 40, dtype=torch.long), 1)
    with pytest.raises(SLMError, match="empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 1)
    with pytest.raises(SLMError, match="vocab"):
        model.generate(torch.full((1, 3), 99), 1)


def test_save_and_load_is_bit_exact(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = CausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, GPTForCausalLM)
    assert loaded.lm_head.weight.data_ptr() == loaded.embed_tokens.weight.data_ptr()  # tying survives
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), name
    ids = torch.randint(0, 50, (1, 9))
    assert torch.equal(model(ids).logits, loaded.eval()(ids).logits)


def test_load_refuses_other_architecture_and_truncated_files(model, tmp_path):
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["d_model"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SLMError, match="shape"):
        CausalLM.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(SLMError, match="model.safetensors"):
        CausalLM.from_pretrained(tmp_path)
    with pytest.raises(SLMError, match="missing"):
        CausalLM.from_pretrained(tmp_path / "nope")


def test_config_validation_names_the_field():
    with pytest.raises(SLMError, match="n_heads"):
        GPTConfig(d_model=30, n_heads=4)
    with pytest.raises(SLMError, match="did you mean 'n_layers'"):
        config_from_dict({"family": "gpt", "n_layer": 3})
    with pytest.raises(SLMError, match="expected an integer"):
        config_from_dict({"family": "gpt", "n_layers": "four"})
    with pytest.raises(SLMError, match="unknown model family"):
        config_from_dict({"family": "gpt5"})
    with pytest.raises(SLMError, match="preset"):
        config_from_dict({"family": "gpt", "preset": "huge"})
    cfg = config_from_dict({"family": "gpt", "preset": "nanogpt-cpu", "vocab_size": 65})
    assert (cfg.n_layers, cfg.d_model, cfg.context_length, cfg.dropout) == (4, 128, 64, 0.0)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg


def test_default_preset_matches_seed_004():
    cfg = GPTConfig.small()
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.intermediate_size, cfg.context_length) == (4, 256, 4, 1024, 256)
