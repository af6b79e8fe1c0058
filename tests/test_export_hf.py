"""Exports that stock transformers loads, with equal logits (the real consumer is the judge)."""

import pytest
import torch

import transformers  # a dev dependency: `make test` installs it

from simplified_slm.export.hf import export_hf, import_hf_llama
from simplified_slm.models import GPTConfig, build_model
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
    back = import_hf_llama(tmp_path)
    ids = torch.randint(0, 90, (1, 16))
    assert torch.allclose(back(ids).logits, model(ids).logits, atol=1e-5)
    assert back.config.rope_scaling == model.config.rope_scaling
