"""Behaviour every recurrent family promises, checked once for each of them."""

import pytest
import torch

from simplified_slm.models import SimplifiedSLMConfig, SimplifiedSLMForCausalLM
from test_models_spiking import spiking_model


def hgrn_bit_model() -> SimplifiedSLMForCausalLM:
    torch.manual_seed(0)
    m = SimplifiedSLMForCausalLM(SimplifiedSLMConfig(hidden_size=64, num_hidden_layers=3, num_heads=2))
    with torch.no_grad():  # give the lower bounds something to do
        m.lower_bounds.normal_()
    return m.eval()


FAMILIES = {"hgrn_bit": hgrn_bit_model, "spiking": spiking_model}


@pytest.fixture(params=sorted(FAMILIES))
def model(request):
    return FAMILIES[request.param]()


def test_causality(model):
    ids = torch.randint(0, 256, (1, 40))
    changed = ids.clone()
    changed[0, 25] = (ids[0, 25] + 7) % 256
    a, b = model(ids).logits, model(changed).logits
    assert torch.equal(a[0, :25], b[0, :25])
    assert not torch.allclose(a[0, 25:], b[0, 25:])


def test_left_padding_matches_single_prompt(model):
    a, b = torch.randint(0, 256, (1, 8)), torch.randint(0, 256, (1, 5))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    out = model.generate(batch, 15, greedy=True, attention_mask=mask)
    assert torch.equal(out[1, 3:], model.generate(b, 15, greedy=True)[0])


def test_every_parameter_gets_a_gradient(model):
    model.train()
    ids = torch.randint(0, 256, (2, 33))
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
