"""bitnet (TinyLM): BitLinear everywhere, SubLN, no biases, cache, ternary freeze, MLA."""

import csv
import gzip
import json
import subprocess
from pathlib import Path

import pytest
import torch

from simplified_slm.data import DataConfig, prepare_dataset
from simplified_slm.data.corpus import builtin_dataset
from simplified_slm.errors import SLMError
from simplified_slm.layers.attention import attention_bias
from simplified_slm.layers.bitlinear import BitLinear
from simplified_slm.layers.mla import MLACache, MLADims, MultiHeadLatentAttention
from simplified_slm.layers.rope import RotaryEmbedding
from simplified_slm.models import CausalLM
from simplified_slm.models.bitnet import BitNetConfig, BitNetForCausalLM, cache_bytes_per_token
from simplified_slm.tokenizers import ByteTokenizer
from simplified_slm.training.config import load_experiment_config


@pytest.fixture
def model():
    torch.manual_seed(0)
    return BitNetForCausalLM(BitNetConfig.preset("tiny", vocab_size=100)).eval()


def test_structure(model):
    projections = [m for name, m in model.named_modules() if name.endswith("_proj")]
    assert projections and all(isinstance(m, BitLinear) and m.norm is None and m.bias is None for m in projections)
    block = model.layers[0]
    assert isinstance(block.self_attn.output_norm, torch.nn.RMSNorm)  # SubLN before o_proj
    assert isinstance(block.mlp.inner_norm, torch.nn.RMSNorm)  # SubLN before down_proj
    assert not any("bias" in name for name, _ in model.named_parameters())


def test_tinylm_preset_parameter_count():
    with torch.device("meta"):
        assert BitNetForCausalLM(BitNetConfig.preset("tinylm")).num_parameters() == 109_563_648


@pytest.mark.parametrize("act", ["silu", "relu2"])
def test_cache_and_padding(act):
    torch.manual_seed(0)
    model = BitNetForCausalLM(BitNetConfig.preset("tiny", vocab_size=100, hidden_act=act)).eval()
    prompt = torch.randint(0, 100, (2, 6))
    assert torch.equal(model.generate(prompt, 20, greedy=True), model.generate(prompt, 20, greedy=True, use_cache=False))
    a, b = torch.randint(0, 100, (1, 7)), torch.randint(0, 100, (1, 3))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    assert torch.equal(model.generate(batch, 8, greedy=True, attention_mask=mask)[1, 4:],
                       model.generate(b, 8, greedy=True)[0])


def test_freeze_matches_fake_quant_exactly_and_gradients_flow(model, tmp_path):
    ids = torch.randint(0, 100, (2, 12))
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    reference = model(ids).logits
    model.save_pretrained(tmp_path)
    for int8 in (False, True):
        frozen = CausalLM.from_pretrained(tmp_path).eval().freeze_ternary(int8=int8)
        # integer sums are exact in float32 whatever the kernel, then one shared division
        assert torch.equal(frozen(ids).logits, reference)


# --- multi-head latent attention ---------------------------------------------------------

def _mla_model(seed: int = 0, **overrides) -> BitNetForCausalLM:
    torch.manual_seed(seed)
    return BitNetForCausalLM(BitNetConfig.preset("tiny-mla", vocab_size=100, **overrides)).eval()


def test_mla_structure_and_its_cache_holds_only_latents():
    model = _mla_model()
    attn = model.layers[0].self_attn
    assert isinstance(attn, MultiHeadLatentAttention)
    projections = [m for name, m in model.named_modules() if name.endswith(("_proj", "_proj_with_mqa"))]
    assert len(projections) == 2 * 8  # q_a, q_b, kv_a, kv_b, o + gate, up, down
    assert all(isinstance(m, BitLinear) and m.norm is None and m.bias is None for m in projections)
    assert isinstance(attn.kv_a_layernorm, torch.nn.RMSNorm) and isinstance(attn.q_a_layernorm, torch.nn.RMSNorm)
    assert isinstance(attn.output_norm, torch.nn.RMSNorm)  # SubLN before o_proj
    assert model.rotary.head_dim == 8  # only the shared rope key rotates
    cache = model.make_cache(2, 10)
    assert isinstance(cache, MLACache) and [tuple(t.shape) for t in cache.latents] == [(2, 10, 32 + 8)] * 2
    plain = _mla_model(q_lora_rank=None).layers[0].self_attn
    assert isinstance(plain.q_proj, BitLinear) and not hasattr(plain, "q_a_proj")


def test_cache_bytes_per_token_mla_vs_mha_and_gqa_at_equal_width():
    """tinylm width (768, 12 layers, 12 heads of 64): MHA 2*12*64, GQA-4 2*4*64, MLA 256 + 32 per layer."""
    configs = {"mha": BitNetConfig.preset("tinylm"), "gqa": BitNetConfig.preset("tinylm", num_key_value_heads=4),
               "mla": BitNetConfig.preset("tinylm-mla")}
    got = {name: cache_bytes_per_token(cfg) for name, cfg in configs.items()}
    assert got == {"mha": 73728, "gqa": 24576, "mla": 13824}
    for name, cfg in configs.items():  # the caches really allocate that much
        with torch.device("meta"):
            cache = BitNetForCausalLM(cfg).make_cache(1, 16)
        assert cache.nbytes() == 16 * got[name]


@pytest.mark.parametrize("q_lora_rank", [None, 48])
def test_mla_absorbed_decoding_equals_the_expanded_form(q_lora_rank):
    """With float projections the cached (absorbed) path is the uncached one up to rounding."""
    torch.manual_seed(0)
    dims = MLADims(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, q_lora_rank=q_lora_rank)
    attn = MultiHeadLatentAttention(64, 4, dims).eval()
    rope = RotaryEmbedding(8)
    x, positions = torch.randn(2, 20, 64), torch.arange(20)[None]
    with torch.no_grad():
        full = attn(x, attention_bias(20, 0, None, None, x.device), rotary=rope.rotary_for(positions))
        cache = MLACache(1, 2, dims, 20, torch.float32, "cpu")
        parts = []
        for start, end in [(0, 8), (8, 11), *[(i, i + 1) for i in range(11, 20)]]:  # prompt, chunk, steps
            bias = attention_bias(end - start, start, None, None, x.device)
            parts.append(attn(x[:, start:end], bias, rotary=rope.rotary_for(positions[:, start:end]),
                              cache=cache))
            cache.advance(end - start)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_mla_generation_cache_padding_and_freeze(implementation):
    model = _mla_model(attn_implementation=implementation)
    prompt = torch.randint(0, 100, (2, 6))
    assert torch.equal(model.generate(prompt, 20, greedy=True), model.generate(prompt, 20, greedy=True, use_cache=False))
    ids = torch.randint(0, 100, (2, 24))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.make_cache(2, 24)
        steps = [model(ids[:, :8], cache=cache).logits] + [model(ids[:, i:i + 1], cache=cache).logits
                                                           for i in range(8, 24)]
    # absorbed decoding rounds differently; an int8 activation level can flip (see ops/bitnet.py)
    assert (torch.cat(steps, 1) - full).abs().mean() <= 1e-4
    a, b = torch.randint(0, 100, (1, 7)), torch.randint(0, 100, (1, 3))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    assert torch.equal(model.generate(batch, 8, greedy=True, attention_mask=mask)[1, 4:],
                       model.generate(b, 8, greedy=True)[0])
    reference = model.generate(prompt, 12, greedy=True)
    assert torch.equal(model.freeze_ternary(int8=True).generate(prompt, 12, greedy=True), reference)


def test_mla_trains():
    model = _mla_model().train()
    ids = torch.randint(0, 100, (2, 16))
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("overrides,field", [
    (dict(attention="gqa"), "attention"),
    (dict(kv_lora_rank=16), "kv_lora_rank"),  # an MLA width without attention "mla"
    (dict(attention="mla", num_key_value_heads=2), "num_key_value_heads"),
    (dict(attention="mla", qk_rope_head_dim=6, num_key_value_heads=None), None),
    (dict(attention="mla", qk_rope_head_dim=5, num_key_value_heads=None), "qk_rope_head_dim"),
    (dict(attention="mla", kv_lora_rank=0, num_key_value_heads=None), "kv_lora_rank"),
    (dict(attention="mla", sliding_window=8, num_key_value_heads=None), "sliding_window"),
])
def test_mla_config_errors_name_the_field(overrides, field):
    if field is None:
        assert BitNetConfig.preset("tiny", **overrides).mla_dims().qk_rope_head_dim == 6
        return
    with pytest.raises(SLMError, match=rf"BitNetConfig\.{field}"):
        BitNetConfig.preset("tiny", **overrides)


# --- TinyLM's training setup: JSONL train/val files, TinyLM configs --------------------

REPO = Path(__file__).resolve().parents[2]


def test_seed_jsonl_train_and_val_files_prepare_as_separate_splits(tmp_path):
    """TinyLM trains from `{"text": ...}` lines in train_file / val_file."""
    stories = gzip.open(builtin_dataset("tinystories").valid, "rt", encoding="utf-8").read().split("\n\n")[:60]
    train, val = stories[:50], stories[50:]
    for name, texts in (("train.jsonl", train), ("val.jsonl", val)):
        (tmp_path / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    cfg = DataConfig.from_dict({"train_file": str(tmp_path / "train.jsonl"), "val_file": str(tmp_path / "val.jsonl")})
    data = prepare_dataset(cfg, ByteTokenizer(), tmp_path / "prepared")
    assert data.meta["splits"]["train"]["documents"] == 50 and data.meta["splits"]["val"]["documents"] == 10
    assert bytes(data.val).decode() == "".join(val)  # the byte tokenizer has no eos between documents
    assert data.meta["val_from"] == str(tmp_path / "val.jsonl")


def test_tinylm_configs_carry_the_seed_hyperparameters():
    seed = load_experiment_config(REPO / "configs" / "tinylm.json")
    t = seed.train
    assert (t.lr, t.weight_decay, t.warmup_steps, tuple(t.betas), t.batch_size, t.block_size) == \
        (2e-4, 0.1, 375, (0.9, 0.95), 16, 2048)
    assert seed.tokenizer.kind == "bpe" and seed.data.dataset == "tinystories"
    model = seed.model_config(seed.tokenizer.vocab_size)
    assert model.attention == "mla" and model.max_position_embeddings >= 2048
    with torch.device("meta"):  # TinyLM's 768 x 12 x 12 shape, ~90M parameters with an 8k BPE vocab
        assert 80e6 < BitNetForCausalLM(model).num_parameters() < 110e6
    tiny = load_experiment_config(REPO / "configs" / "tinylm_tiny.json")
    assert tiny.model_config(tiny.tokenizer.vocab_size).attention == "mla" and tiny.tokenizer.kind == "bpe"


@pytest.mark.slow
def test_tinylm_tiny_trains_on_tinystories_and_generates(tmp_path, python_exe):
    """The tiny preset's model, tokenizer and data learn: validation BPB < 2.2 after 250 of
    its 400 steps (~1 min on 2 idle CPU cores; the whole preset took 6 min of the suite's
    budget beside the other test worker).

    Baselines on the bundled TinyStories validation text: the byte-unigram entropy is
    4.29 bits/byte, and a unigram model over the preset's 1024 BPE tokens (counts from the
    training split) 2.60 bits/byte. Below 2.2 needs context; 250 steps reach 1.92 (measured,
    seed 1337; 2.16 at step 100, 1.95 at step 200; the full preset 1.82), so the margin
    covers thread-count and platform rounding differences.
    """
    run_dir = tmp_path / "run"
    train = subprocess.run([python_exe, "-m", "simplified_slm.cli", "train", "--config",
                            str(REPO / "configs" / "tinylm_tiny.json"), "--output_dir", str(run_dir),
                            "--set", "train.max_steps=250"],
                           capture_output=True, text=True)
    assert train.returncode == 0, train.stderr[-2000:]
    with open(run_dir / "metrics.csv", newline="") as fh:
        bpb = [float(row["value"]) for row in csv.DictReader(fh) if row["name"] == "val/bpb"]
    assert bpb and bpb[-1] < 2.2, bpb
    gen = subprocess.run([python_exe, "-m", "simplified_slm.cli", "generate", "--model_path",
                          str(run_dir / "checkpoints" / "best"), "--prompt", "once upon a time",
                          "--max_tokens", "30", "--seed", "0"], capture_output=True, text=True)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.startswith("once upon a time") and len(gen.stdout) > len("once upon a time") + 20
