"""bitnet (seed 001 TinyLM): BitLinear everywhere, SubLN, no biases, cache, ternary freeze."""

import pytest
import torch

from simplified_slm.models import CausalLM
from simplified_slm.models.bitnet import BitNetConfig, BitNetForCausalLM
from simplified_slm.ops.bitnet import BitLinear


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


def test_freeze_matches_fake_quant_and_gradients_flow(model, tmp_path):
    ids = torch.randint(0, 100, (2, 12))
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    reference = model(ids).logits
    model.save_pretrained(tmp_path)
    for int8 in (False, True):
        frozen = CausalLM.from_pretrained(tmp_path).eval()
        for module in frozen.modules():
            if isinstance(module, BitLinear):
                module.freeze(int8=int8)
        diff = (frozen(ids).logits - reference).abs()
        if not int8:  # float codes reproduce the fake-quant forward exactly
            assert diff.max() <= 1e-6
        else:
            # int8 sums round differently by ~1e-7; after SubLN an activation sitting on an
            # int8 rounding boundary can flip one level, so compare in aggregate and by tokens
            assert diff.mean() <= 2e-3
            prompt = ids[:1, :5]
            assert torch.equal(frozen.generate(prompt, 10, greedy=True), model.generate(prompt, 10, greedy=True))
