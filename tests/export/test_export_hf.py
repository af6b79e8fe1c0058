"""Exports that stock transformers loads, with equal logits (the real consumer is the judge)."""

import json

import pytest
import torch

import transformers  # a dev dependency: `make test` installs it

from simplified_slm.errors import SLMError
from simplified_slm.export.hf import export_hf, import_hf, to_transformers
from simplified_slm.models import GPTConfig, build_model
from simplified_slm.models.bitnet import BitNetConfig, BitNetForCausalLM
from simplified_slm.models.llama import LLAMA3_ROPE, LlamaConfig, LlamaForCausalLM


def _compare(ours, directory, vocab):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    ids = torch.randint(0, vocab, (2, 24))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff
    prompt = ids[:1, :8]
    greedy_hf = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    assert torch.equal(greedy_hf, ours.generate(prompt, 12, greedy=True))
    return hf


@pytest.mark.parametrize("bias,tied,act", [(True, True, "gelu_tanh"), (False, False, "gelu")])
def test_gpt_exports_as_gpt2(tmp_path, bias, tied, act):
    torch.manual_seed(0)
    model = build_model(GPTConfig(vocab_size=80, n_layers=2, d_model=32, n_heads=4, context_length=64,
                                  dropout=0.0, bias=bias, tie_embeddings=tied, activation=act,
                                  init_std=0.3)).eval()  # well-separated logits: greedy ties are unlikely
    export_hf(model, tmp_path)
    hf = _compare(model, tmp_path, 80)
    assert type(hf).__name__ == "GPT2LMHeadModel"


@pytest.mark.parametrize("scaling", [None, LLAMA3_ROPE, {"rope_type": "linear", "factor": 2.0}])
def test_llama_exports_and_imports(tmp_path, scaling):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.preset("tiny", vocab_size=90, rope_scaling=scaling,
                                                rope_theta=500000.0 if scaling else 10000.0,
                                                initializer_range=0.3)).eval()
    export_hf(model, tmp_path)
    hf = _compare(model, tmp_path, 90)
    assert type(hf).__name__ == "LlamaForCausalLM"
    back = import_hf(tmp_path)
    ids = torch.randint(0, 90, (1, 16))
    assert torch.allclose(back(ids).logits, model(ids).logits, atol=1e-5)
    assert back.config.rope_scaling == model.config.rope_scaling


# --- bitnet -> transformers' BitNetForCausalLM (packed ternary weights) ----------------

def _story_ids(rows: int = 2, length: int = 96) -> torch.Tensor:
    """Byte ids of real text: TinyStories validation stories from the bundled corpus."""
    from simplified_slm.data.corpus import builtin_dataset, read_documents
    from simplified_slm.tokenizers import ByteTokenizer

    text = next(iter(read_documents(str(builtin_dataset("tinystories").valid)))).text
    ids = ByteTokenizer().encode_ids(text[:rows * length * 2])
    return torch.tensor(ids[:rows * length]).view(rows, length)


def _trained_bitnet(**overrides) -> BitNetForCausalLM:
    """A tiny bitnet model after a few AdamW steps on the story bytes (non-random weights)."""
    torch.manual_seed(0)
    model = BitNetForCausalLM(BitNetConfig.preset("tiny", vocab_size=256, **overrides))
    ids = _story_ids(4, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(5):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("kv_heads,act,scaling", [(4, "silu", None),  # MHA, TinyLM's SwiGLU
                                                  (2, "relu2", {"rope_type": "linear", "factor": 2.0})])  # GQA
def test_bitnet_exports_as_transformers_bitnet(tmp_path, kv_heads, act, scaling):
    from safetensors import safe_open

    model = _trained_bitnet(num_key_value_heads=kv_heads, hidden_act=act, rope_scaling=scaling)
    export_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "bitnet" and config["quantization_config"]["quant_method"] == "bitnet"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        assert q.dtype == torch.uint8 and q.shape == (64 // 4, 64)  # 4 ternary codes per byte
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale").shape == (1,)
        assert "model.layers.0.self_attn.attn_sub_norm.weight" in f.keys()
        assert "model.layers.0.mlp.ffn_sub_norm.weight" in f.keys()

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(hf).__name__ == "BitNetForCausalLM"
    assert type(hf.model.layers[0].mlp.down_proj).__name__ == "BitLinear"
    ids = _story_ids()
    frozen = _trained_bitnet(num_key_value_heads=kv_heads, hidden_act=act, rope_scaling=scaling)
    with torch.no_grad():
        want = hf(ids).logits
        # same formula, same operation order (integer sums, then one division): exact
        assert (model(ids).logits - want).abs().max().item() <= 1e-4
        assert torch.equal(frozen.freeze_ternary(int8=True)(ids).logits, want)
    prompt = ids[:1, :16]
    greedy_hf = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    assert torch.equal(greedy_hf, model.generate(prompt, 12, greedy=True))


def test_bitnet_export_from_the_cli_and_of_a_frozen_model(tmp_path, python_exe):
    import copy
    import subprocess

    from simplified_slm.tokenizers import ByteTokenizer

    model = _trained_bitnet()
    model.save_pretrained(tmp_path / "model", tokenizer=ByteTokenizer())
    run = subprocess.run([python_exe, "-m", "simplified_slm.cli", "export", "--checkpoint", str(tmp_path / "model"),
                          "--format", "hf", "--out", str(tmp_path / "hf")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    # frozen BitLinears (codes + scale, no float weight) export their stored codes
    export_hf(copy.deepcopy(model).freeze_ternary(int8=True), tmp_path / "hf_frozen")
    ids = _story_ids(1, 48)
    with torch.no_grad():
        want = model(ids).logits
        for folder in ("hf", "hf_frozen"):
            hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / folder)).eval()
            assert torch.equal(hf(ids).logits, want)
        assert torch.equal(to_transformers(model)(ids).logits, want)  # in memory, via a temporary folder


def test_mla_and_unpackable_bitnet_exports_fail_clearly(tmp_path):
    mla = BitNetForCausalLM(BitNetConfig.preset("tiny-mla", vocab_size=64))
    with pytest.raises(SLMError, match="multi-head latent attention has no transformers counterpart"):
        export_hf(mla, tmp_path / "mla")
    wide = BitNetForCausalLM(BitNetConfig.preset("tiny", vocab_size=64, head_dim=32))
    with pytest.raises(SLMError, match="sizes its attention SubLN by hidden_size"):
        export_hf(wide, tmp_path / "wide")
    odd = BitNetForCausalLM(BitNetConfig.preset("tiny", vocab_size=64, intermediate_size=90))
    with pytest.raises(SLMError, match="divisible by 4"):
        export_hf(odd, tmp_path / "odd")
    assert not (tmp_path / "mla").exists()


# --- the exported tokenizer, as transformers' AutoTokenizer loads it ------------------------

TOKENIZER_TEXTS = ["Once upon a time, a little girl named Lily found a shiny red ball.",
                   "  Two  spaces, tabs\tand\nnew lines; café, naïve, 日本語 and emoji 🙂!",
                   "the end.<|endoftext|>Another story"]


def test_exported_bpe_tokenizer_loads_in_auto_tokenizer(tmp_path, python_exe):
    import subprocess

    from simplified_slm.data.corpus import read_documents
    from simplified_slm.tokenizers import BPETokenizer, load_tokenizer

    text = "".join(d.text for d in read_documents("tinystories", split="validation"))[:200_000]
    ours = BPETokenizer.train([text], vocab_size=400)
    torch.manual_seed(0)
    model = build_model(GPTConfig(vocab_size=ours.vocab_size, n_layers=1, d_model=32, n_heads=2,
                                  context_length=48, dropout=0.0, init_std=0.3)).eval()
    model.save_pretrained(tmp_path / "model", tokenizer=ours)
    run = subprocess.run([python_exe, "-m", "simplified_slm.cli", "export", "--checkpoint", str(tmp_path / "model"),
                          "--format", "hf", "--out", str(tmp_path / "hf")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr

    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for sample in TOKENIZER_TEXTS:
        ids = ours.encode_ids(sample)
        assert auto(sample)["input_ids"] == ids
        assert auto.decode(ids) == ours.decode(ids) == sample
    assert (auto.eos_token, auto.pad_token) == ("<|endoftext|>", "<|pad|>")
    assert (auto.eos_token_id, auto.pad_token_id) == (ours.eos_token_id, ours.pad_token_id)
    assert auto.model_max_length == 48 and auto.padding_side == "right"
    batch = auto(TOKENIZER_TEXTS[:2], padding=True)
    short = len(ours.encode_ids(TOKENIZER_TEXTS[0]))
    assert batch["input_ids"][0][short:] == [ours.pad_token_id] * (len(batch["input_ids"][0]) - short)
    assert batch["attention_mask"][0] == [1] * short + [0] * (len(batch["input_ids"][0]) - short)

    # our own loader still reads the folder as the same tokenizer
    back = load_tokenizer(tmp_path / "hf")
    assert isinstance(back, BPETokenizer) and back.special_ids() == ours.special_ids()
    assert back.encode_ids(TOKENIZER_TEXTS[1]) == ours.encode_ids(TOKENIZER_TEXTS[1])

    # transformers end to end: its tokenizer, its model, our text
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    prompt = auto("Once upon a time", return_tensors="pt")
    out = hf.generate(**prompt, max_new_tokens=10, do_sample=False)
    assert auto.decode(out[0]) == ours.decode(model.generate(prompt["input_ids"], 10, greedy=True)[0])


def test_exported_byte_tokenizer_loads_in_auto_tokenizer(tmp_path):
    from simplified_slm.tokenizers import ByteTokenizer, CharTokenizer, load_tokenizer

    torch.manual_seed(0)
    model = build_model(GPTConfig(vocab_size=256, n_layers=1, d_model=32, n_heads=2, context_length=32))
    export_hf(model, tmp_path / "bytes", ByteTokenizer())
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "bytes"))
    for sample in TOKENIZER_TEXTS:
        ids = list(sample.encode("utf-8"))
        assert auto(sample)["input_ids"] == ids
        assert auto.decode(ids) == sample
    assert isinstance(load_tokenizer(tmp_path / "bytes"), ByteTokenizer)
    # char vocabularies stay ours only (no exact `tokenizers` equivalent); our loader reads them
    char = CharTokenizer()
    export_hf(build_model(GPTConfig(vocab_size=char.vocab_size, n_layers=1, d_model=32, n_heads=2,
                                    context_length=32)), tmp_path / "chars", char)
    assert isinstance(load_tokenizer(tmp_path / "chars"), CharTokenizer)


class _RunsCode:
    """Unpickling this creates a file: what a hostile pytorch_model.bin could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return Path.touch, (Path(self.marker),)


def test_import_reads_safetensors_only_and_refuses_pickle_weights(tmp_path, monkeypatch):
    import pickle
    import shutil

    model = LlamaForCausalLM(LlamaConfig.preset("tiny", vocab_size=64)).eval()
    export_hf(model, tmp_path / "good")
    calls = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    import_hf(tmp_path / "good")
    assert calls and calls[0].get("use_safetensors") is True  # transformers never falls back to .bin

    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(tmp_path / "good" / "config.json", bad / "config.json")
    marker = tmp_path / "code_ran"
    (bad / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": _RunsCode(marker)}))
    with pytest.raises(SLMError) as err:
        import_hf(bad)
    assert "no safetensors weights (only pytorch_model.bin (pickle" in str(err.value)
    assert "\n" not in str(err.value) and not marker.exists()
    assert len(calls) == 1  # refused before transformers was asked to load anything
    # other safetensors files beside the pickle: transformers is told to read safetensors only
    shutil.copy(tmp_path / "good" / "model.safetensors", bad / "adapter.safetensors")
    with pytest.raises(SLMError, match="no file named model.safetensors"):
        import_hf(bad)
    assert calls[-1].get("use_safetensors") is True and not marker.exists()
