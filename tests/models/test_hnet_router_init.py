"""hnet_bit router input bias: routing starts with few boundaries, the ratio loss raises p."""

import pytest
import torch

from simplified_slm.layers.routing import RoutingModule
from simplified_slm.models.hnet_bit import HNetBitConfig, HNetBitForCausalLM
from simplified_slm.ops.dynamic_chunking import ratio_loss

SMALL = dict(d_model=[32, 48], encoder_layers=[1], decoder_layers=[1], main_layers=1, target_ratio=[3.0],
             router_bias_init=1.0)


def _encoder_like(batch: int, length: int, dim: int) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.nn.functional.rms_norm(torch.randn(batch, length, dim), (dim,))


def test_bias_starts_routing_below_the_target_so_the_ratio_loss_raises_p():
    x = _encoder_like(4, 200, 64)
    plain, biased = RoutingModule(64), RoutingModule(64, bias_init=1.0)
    assert torch.equal(biased.q_proj.weight, torch.eye(64)) and torch.equal(biased.bias, torch.ones(64))
    p_plain, p = plain(x).prob[:, 1:], biased(x).prob[:, 1:]
    assert abs(p_plain.mean().item() - 0.5) < 0.05       # unrelated vectors: cos ≈ 0, p ≈ 1/2
    assert abs(p.mean().item() - 0.25) < 0.05             # |b| = |x|: cos ≈ 1/2, p ≈ 1/4
    assert (p >= 0.5).float().mean() < 0.05 < 1 / 6 < (p_plain >= 0.5).float().mean() - 0.2
    # the ratio loss (target N = 6) then pushes every p up for the biased router, down for the plain one
    for router, sign in ((biased, -1), (plain, 1)):
        route = router(x)
        prob = route.prob.detach().requires_grad_(True)
        ratio_loss(prob, route.boundary, 6.0).backward()
        assert (torch.sign(prob.grad[:, 1:]) == sign).all()
    # the bias is learned
    biased.zero_grad()
    biased(x).prob.mean().backward()
    assert biased.bias.grad is not None and biased.bias.grad.abs().sum() > 0


def test_1stage_preset_uses_the_bias_and_old_configs_keep_the_plain_router():
    assert HNetBitConfig.preset("1stage").router_bias_init == 1.0
    assert HNetBitConfig.preset("2stage").router_bias_init == 0.0  # N = 3 < bytes per word: no help
    plain = HNetBitConfig(d_model=[32, 48], encoder_layers=[1], decoder_layers=[1], target_ratio=[3.0])
    assert plain.router_bias_init == 0.0 and HNetBitForCausalLM(plain).stage.router.bias is None
    model = HNetBitForCausalLM(HNetBitConfig(**SMALL))
    assert torch.equal(model.stage.router.bias, torch.ones(32))  # survives the generic init


@pytest.mark.parametrize("fields", [SMALL, dict(d_model=[32, 40, 48], encoder_layers=[1, 1], decoder_layers=[1, 1],
                                                main_layers=1, target_ratio=[2.0, 2.0], router_bias_init=1.0)])
def test_biased_router_model_caches_and_gets_gradients(fields):
    torch.manual_seed(0)
    model = HNetBitForCausalLM(HNetBitConfig(**fields)).double()
    routers = [m for m in model.modules() if isinstance(m, RoutingModule)]
    with torch.no_grad():  # randomise the routers so some, not all, positions are boundaries
        for r in routers:
            r.q_proj.weight.normal_(0, 1)
            r.k_proj.weight.normal_(0, 1)
            r.bias.normal_(0, 1)
    ids = torch.randint(0, 256, (2, 40))
    out = model(ids, labels=ids)
    for routing in model.last_routing:
        assert 0 < routing.boundary[routing.mask].float().mean() < 1
    (out.loss + out.aux_loss).backward()
    for r in routers:
        for p in (r.q_proj.weight, r.k_proj.weight, r.bias):
            assert p.grad is not None and p.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        full = model(ids).logits
        cache = model.make_cache(2, 40)
        prefix = model(ids[:, :10], cache=cache).logits
        steps = torch.cat([model(ids[:, t:t + 1], cache=cache).logits for t in range(10, 40)], dim=1)
    assert torch.allclose(torch.cat([prefix, steps], 1), full, atol=1e-9)
