"""The public API: the original names still import, every family is exported, and
`generate` takes transformers' spellings so Hugging-Face-style snippets run."""

import pytest
import torch

import simplified_slm.models as models
from simplified_slm.errors import SLMError
from simplified_slm.layers.recurrent_cache import RecurrentCache
from simplified_slm.models.llama import LlamaConfig, LlamaForCausalLM
from simplified_slm.models.registry import config_class, model_class
from simplified_slm.tokenizers.byte import ByteTokenizer


def test_original_names_are_re_exported():
    from simplified_slm.models import SimplifiedSLMConfig, SimplifiedSLMForCausalLM
    from simplified_slm.utils import ByteTokenizer as OldByteTokenizer
    from simplified_slm.utils import RecurrentCache as OldRecurrentCache

    assert OldByteTokenizer is ByteTokenizer and OldRecurrentCache is RecurrentCache
    assert SimplifiedSLMConfig is config_class("hgrn_bit") and SimplifiedSLMForCausalLM is model_class("hgrn_bit")


def test_models_exports_every_family_config_and_model():
    exported = {getattr(models, name) for name in models.__all__}
    for family in models.families():
        assert config_class(family) in exported and model_class(family) in exported, family


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig.preset("tiny", vocab_size=50)).eval()


PROMPT = torch.tensor([[3, 1, 4, 1], [5, 9, 2, 6]])


def test_max_length_counts_the_prompt(model):
    assert model.generate(PROMPT, max_length=10, greedy=True).shape == (2, 10)
    assert model.generate(PROMPT, max_length=4).shape == (2, 4)
    # max_new_tokens wins when both are given, as in transformers
    assert model.generate(PROMPT, max_new_tokens=3, max_length=10).shape == (2, 7)
    with pytest.raises(SLMError, match="max_length 3 is shorter than the prompt"):
        model.generate(PROMPT, max_length=3)


def test_do_sample_false_is_greedy_and_true_samples(model):
    greedy = model.generate(PROMPT, 8, greedy=True)
    assert torch.equal(model.generate(PROMPT, 8, do_sample=False), greedy)
    sampled = model.generate(PROMPT, 8, do_sample=True, seed=0)
    assert torch.equal(sampled, model.generate(PROMPT, 8, seed=0))
    with pytest.raises(SLMError, match="contradict"):
        model.generate(PROMPT, 8, greedy=True, do_sample=True)


def test_hugging_face_style_call_runs(model):
    free = model.generate(PROMPT, max_length=12, do_sample=False)
    eos = int(free[0, 4])  # row 0 ends at its first new token
    mask = torch.ones_like(PROMPT)
    out = model.generate(PROMPT, attention_mask=mask, max_length=12, do_sample=False,
                         pad_token_id=0, eos_token_id=eos)
    assert out[0, 4] == eos and (out[0, 5:] == 0).all()
    assert torch.equal(out[1], free[1, :out.shape[1]])  # the run stops once row 1 finishes too
    # several end-of-sequence ids, as Llama 3 configs give them: either one ends a row
    both = model.generate(PROMPT, max_length=12, do_sample=False, pad_token_id=0,
                          eos_token_id=[int(free[1, 4]), eos])
    assert both.shape == (2, 5) and torch.equal(both[:, 4], free[:, 4])
