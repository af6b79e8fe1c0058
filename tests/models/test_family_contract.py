"""What every model family promises, checked once for each of the six: causality, left-padded
batches equal to single prompts, cached decoding equal to full forwards, and a gradient for
every parameter."""

import pytest
import torch

from conftest import FAMILY_CONFIGS, family_model


@pytest.fixture(params=sorted(FAMILY_CONFIGS))
def model(request):
    return family_model(request.param)


def test_causality(model):
    ids = torch.randint(0, 256, (1, 40))
    changed = ids.clone()
    changed[0, 25] = (ids[0, 25] + 7) % 256
    a, b = model(ids).logits, model(changed).logits
    assert torch.equal(a[0, :25], b[0, :25])
    assert not torch.allclose(a[0, 25:], b[0, 25:])


def test_left_padding_matches_single_prompt(model):
    torch.manual_seed(1)
    a, b = torch.randint(0, 256, (1, 8)), torch.randint(0, 256, (1, 5))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    out = model.generate(batch, 15, greedy=True, attention_mask=mask)
    assert torch.equal(out[1, 3:], model.generate(b, 15, greedy=True)[0])


def test_cached_decoding_equals_full_forward(model):
    torch.manual_seed(2)
    ids = torch.randint(0, 256, (2, 24))
    full = model(ids).logits
    out = model(ids[:, :10], use_cache=True)
    steps, cache = [out.logits], out.cache
    for t in range(10, ids.shape[1]):
        out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
        steps.append(out.logits)
        cache = out.cache
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


def test_every_parameter_gets_a_gradient(model):
    model.train()
    ids = torch.randint(0, 256, (2, 33))
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
