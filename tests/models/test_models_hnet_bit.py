"""hnet_bit (the original reference's HNetBit): dynamic chunking ops, causality, cache, gradients, training."""

import json

import pytest
import torch

from conftest import REPO, tiny_experiment
from simplified_slm.errors import SLMError
from simplified_slm.evaluation.boundaries import boundary_report, mark_boundaries
from simplified_slm.layers.routing import RoutingModule
from simplified_slm.models import CausalLM, build_model, config_from_dict
from simplified_slm.models.hnet_bit import HNetBitConfig, HNetBitForCausalLM
from simplified_slm.ops.dynamic_chunking import (
    confidence_ste,
    downsample,
    ema_dechunk,
    ratio_loss,
    upsample,
)
from simplified_slm.tokenizers.byte import ByteTokenizer

# some stacks have two layers so the forget-gate lower bounds are exercised too
ONE_STAGE = dict(d_model=[32, 48], encoder_layers=[2], decoder_layers=[1], main_layers=1, target_ratio=[3.0])
TWO_STAGE = dict(d_model=[32, 40, 48], encoder_layers=[1, 1], decoder_layers=[2, 1], main_layers=2,
                 target_ratio=[2.0, 2.0])


def make_model(fields: dict, seed: int = 0, router_std: float = 1.0,
               dtype: torch.dtype = torch.float64) -> HNetBitForCausalLM:
    """A small float64 model whose routers are randomised so some, not all, positions are
    boundaries.

    float64: BitLinear's logits are integer sums times a scale, so candidates tie exactly
    and a float32 rounding difference (chunked scan vs stepping, different chunk counts)
    can move an int8 activation level (~1e-3) or a boundary with p within 1e-3 of 0.5, and
    flip a greedy choice. In float64 such flips have probability ~1e-12, so comparisons
    below are exact or at 1e-9 and a real cache or causality bug cannot hide in the noise.
    """
    torch.manual_seed(seed)
    model = HNetBitForCausalLM(HNetBitConfig(**fields))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RoutingModule):
                module.q_proj.weight.normal_(0, router_std)
                module.k_proj.weight.normal_(0, router_std)
    return model.to(dtype).eval()


@pytest.fixture(scope="module", params=["1stage", "2stage"])
def model(request):
    return make_model(ONE_STAGE if request.param == "1stage" else TWO_STAGE)


# ------------------------------------------------------------------ chunking ops
def test_ratio_loss_is_one_at_target_and_grows_away_from_it():
    n = 4.0
    boundary = torch.tensor([[True, False, False, False] * 4])
    prob = torch.full((1, 16), 0.25)
    assert torch.allclose(ratio_loss(prob, boundary, n), torch.tensor(1.0))
    assert ratio_loss(torch.full((1, 16), 0.6), torch.ones(1, 16, dtype=torch.bool), n) > 1.5
    # masked positions do not count
    mask = torch.ones(1, 20, dtype=torch.bool)
    mask[0, :4] = False
    padded_p = torch.cat([torch.full((1, 4), 0.9), prob], 1)
    padded_b = torch.cat([torch.ones(1, 4, dtype=torch.bool), boundary], 1)
    assert torch.allclose(ratio_loss(padded_p, padded_b, n, mask), torch.tensor(1.0))


def test_routing_probabilities_follow_the_cosine_rule():
    router = RoutingModule(8)
    x = torch.randn(2, 6, 8)
    route = router(x)
    cos = torch.nn.functional.cosine_similarity(x[:, 1:], x[:, :-1], dim=-1)  # identity init
    assert torch.allclose(route.prob[:, 1:], (1 - cos) / 2, atol=1e-6)
    assert torch.equal(route.prob[:, 0], torch.ones(2)) and torch.equal(route.boundary, route.prob >= 0.5)
    # continuing from the previous key gives the same probabilities as the whole sequence
    cont = router(x[:, 3:], prev_key=route.key[:, 2])
    assert torch.allclose(cont.prob, route.prob[:, 3:], atol=1e-6)
    # a left-padded row: its first real position opens a chunk, padding is never a boundary
    mask = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    padded = router(x, mask)
    assert padded.prob[1, 2] == 1 and not padded.boundary[1, :2].any()


def test_downsample_right_aligns_chunks_and_upsample_maps_positions_back():
    x = torch.arange(2 * 6, dtype=torch.float32).reshape(2, 6, 1)
    boundary = torch.tensor([[1, 0, 1, 1, 0, 0], [1, 0, 0, 0, 0, 1]], dtype=torch.bool)
    chunks = downsample(x, boundary)
    assert chunks.mask.tolist() == [[True, True, True], [False, True, True]]
    assert chunks.x[..., 0].tolist() == [[0.0, 2.0, 3.0], [0.0, 6.0, 11.0]]
    assert chunks.slot.tolist() == [[0, 0, 1, 2, 2, 2], [1, 1, 1, 1, 1, 2]]
    assert upsample(chunks.x, chunks.slot)[..., 0].tolist() == [[0, 0, 2, 3, 3, 3], [6, 6, 6, 6, 6, 11]]


def test_ema_dechunk_equals_a_naive_loop():
    torch.manual_seed(1)
    z = torch.randn(3, 7, 5, dtype=torch.float64, requires_grad=True)
    prob = torch.rand(3, 7, dtype=torch.float64).clamp(0.5, 1.0)
    prob[:, 0] = 1.0
    prob.requires_grad_(True)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, :3] = False  # a right-aligned row with 4 chunks
    h0 = torch.randn(3, 5, dtype=torch.float64)

    out, final = ema_dechunk(z, prob, mask, initial_state=h0, output_final_state=True)

    state, ref = h0.clone(), []
    for k in range(7):
        p = prob[:, k].clamp(1e-4, 1 - 1e-4)[:, None]
        m = mask[:, k, None].to(z.dtype)
        state = (1 - p) * state + p * z[:, k] * m
        ref.append(state)
    ref = torch.stack(ref, 1)
    assert torch.allclose(out, ref, atol=1e-10) and torch.allclose(final, ref[:, -1], atol=1e-10)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad((out * g).sum(), (z, prob))
    ref_grads = torch.autograd.grad((ref * g).sum(), (z, prob))
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-10)


def test_confidence_ste_is_one_forward_and_passes_the_gradient():
    p = torch.tensor([0.9, 0.2, 0.6], requires_grad=True)
    b = p.detach() >= 0.5
    ste = confidence_ste(p, b)
    assert torch.allclose(ste, torch.ones(3))
    ste.sum().backward()
    assert p.grad.tolist() == [1.0, -1.0, 1.0]


# ------------------------------------------------------------------ the model
def test_config_validation_and_presets():
    for preset in ("tiny", "1stage", "2stage"):
        cfg = HNetBitConfig.preset(preset)
        assert len(cfg.d_model) == cfg.num_stages + 1
    assert HNetBitConfig.preset("2stage").num_stages == 2
    with pytest.raises(SLMError, match="d_model"):
        HNetBitConfig(d_model=[32, 48, 64], encoder_layers=[1], decoder_layers=[1], target_ratio=[2.0])
    with pytest.raises(SLMError, match="shrink"):
        HNetBitConfig(d_model=[64, 32], encoder_layers=[1], decoder_layers=[1], target_ratio=[2.0])
    with pytest.raises(SLMError, match="target_ratio"):
        HNetBitConfig(d_model=[32, 32], encoder_layers=[1], decoder_layers=[1], target_ratio=[1.0])
    with pytest.raises(SLMError, match="decoder_layers"):
        HNetBitConfig(d_model=[32, 32, 32], encoder_layers=[1, 1], decoder_layers=[1], target_ratio=[2.0, 2.0])


def test_config_files_match_presets():
    model_cfg = config_from_dict(json.loads((REPO / "configs" / "hnet_bit_2stage.json").read_text()))
    assert model_cfg == HNetBitConfig.preset("2stage")
    from simplified_slm.training.config import load_experiment_config

    for name in ("1stage", "2stage"):
        exp = load_experiment_config(REPO / "configs" / f"training_{name}_tinystories.json")
        assert exp.model_config(256) == HNetBitConfig.preset(name)


@torch.no_grad()
def test_forward_outputs_aux_loss_and_compression(model):
    torch.manual_seed(2)
    ids = torch.randint(0, 256, (2, 40))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 40, 256) and out.loss is not None
    stages = model.config.num_stages
    assert out.aux_loss is not None and out.aux_loss > 0
    expected = sum(ratio_loss(r.prob, r.boundary, n, r.mask)
                   for r, n in zip(model.last_routing, model.config.target_ratio))
    assert torch.allclose(out.aux_loss, model.config.ratio_loss_weight * expected)
    comp = model.last_compression
    assert set(comp) == {f"hnet/stage{s}/{k}" for s in range(stages) for k in ("bytes_per_chunk", "compression")}
    fraction = model.last_routing[0].boundary.float().mean()
    assert 0.1 < fraction < 0.9, "the randomised router should select some but not all bytes"
    assert comp["hnet/stage0/bytes_per_chunk"] == pytest.approx(1 / float(fraction))
    if stages == 2:
        assert comp["hnet/stage1/bytes_per_chunk"] > comp["hnet/stage0/bytes_per_chunk"]


@torch.no_grad()
def test_causality(model):
    torch.manual_seed(3)
    ids = torch.randint(97, 123, (1, 48))
    base = model(ids).logits
    for t in (0, 5, 17, 30, 46):
        changed = ids.clone()
        changed[0, t + 1] = (ids[0, t + 1] + 13) % 256
        logits = model(changed).logits
        # the main network's chunk count may change, which changes the HGRN scan's float
        # association, hence allclose (float64: 1e-9) rather than equal
        assert torch.allclose(logits[0, :t + 1], base[0, :t + 1], atol=1e-9), t
        assert not torch.allclose(logits[0, t + 1:], base[0, t + 1:], atol=1e-9), t


@torch.no_grad()
def test_cached_greedy_generation_equals_full_recomputation(model):
    torch.manual_seed(4)
    prompt = torch.randint(97, 123, (2, 9))
    cached = model.generate(prompt, 40, greedy=True)
    full = model.generate(prompt, 40, greedy=True, use_cache=False)
    assert torch.equal(cached, full)
    model(full)
    fraction = model.last_routing[0].boundary.float().mean()
    assert 0.1 < fraction < 0.9


@torch.no_grad()
def test_cache_steps_reproduce_the_full_forward_and_run_main_once_per_chunk(model):
    torch.manual_seed(5)
    ids = torch.randint(97, 123, (2, 28))
    full = model(ids).logits
    routing = model.last_routing
    cache = model.make_cache(2, 28)
    prefix = model(ids[:, :12], cache=cache).logits
    assert torch.allclose(prefix, full[:, :12], atol=1e-9)
    steps = torch.cat([model(ids[:, t:t + 1], cache=cache).logits for t in range(12, 20)], 1)
    assert torch.allclose(steps, full[:, 12:20], atol=1e-9)
    # a multi-token continuation of a cached sequence is decoded position by position
    assert torch.allclose(model(ids[:, 20:], cache=cache).logits, full[:, 20:], atol=1e-9)
    assert cache.length == 28
    # every selected boundary was counted once, prefill and steps together ...
    assert cache.chunks == [int(r.boundary.sum()) for r in routing]
    # ... and the main network ran only in steps where some row opened an innermost chunk
    opened = routing[-1].boundary
    if len(routing) > 1:  # innermost positions -> bytes: a stage-1 boundary sits on a stage-0 one
        opened = torch.zeros_like(routing[0].boundary)
        for row in range(2):
            starts = routing[0].boundary[row].nonzero().squeeze(1)
            inner = routing[1].boundary[row][routing[1].mask[row]]
            opened[row, starts[inner]] = True
    assert cache.main_calls == int(opened[:, 12:].any(0).sum()) < 16


@torch.no_grad()
def test_left_padded_batch_matches_single_prompts(model):
    torch.manual_seed(6)
    a, b = torch.randint(97, 123, (1, 11)), torch.randint(97, 123, (1, 6))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    logits = model(batch, attention_mask=mask).logits
    assert torch.allclose(logits[1, 5:], model(b).logits[0], atol=1e-9)
    out = model.generate(batch, 12, greedy=True, attention_mask=mask)
    assert torch.equal(out[1, 5:], model.generate(b, 12, greedy=True)[0])
    assert torch.equal(out[0], model.generate(a, 12, greedy=True)[0])
    with pytest.raises(SLMError, match="no real token"):
        model(batch, attention_mask=torch.zeros_like(batch))


def test_every_parameter_gets_a_gradient(model):
    model.train()
    try:
        ids = torch.randint(0, 256, (3, 40))
        out = model(ids, labels=ids)
        (out.loss + out.aux_loss).backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing
        router_grads = [n for n, _ in model.named_parameters() if "router" in n]
        assert len(router_grads) == 2 * model.config.num_stages
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_initialisation_follows_the_paper():
    model = HNetBitForCausalLM(HNetBitConfig(**TWO_STAGE))
    stage0, stage1 = model.stage, model.stage.inner
    for stage in (stage0, stage1):
        assert torch.equal(stage.router.q_proj.weight, torch.eye(stage.width))
        assert torch.equal(stage.residual_proj.weight, torch.zeros_like(stage.residual_proj.weight))
    assert stage0.pad.shape == (8,) and stage1.pad.shape == (8,)


@pytest.mark.parametrize("fields", [ONE_STAGE, TWO_STAGE])
def test_save_and_load_round_trip(tmp_path, fields):
    model = make_model(fields, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    loaded = CausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, HNetBitForCausalLM) and loaded.config == model.config
    ids = torch.randint(0, 256, (1, 30))
    assert torch.equal(loaded.eval()(ids).logits, model(ids).logits)


def test_mark_boundaries(model):
    text = "once upon a time, a café stood by the sea."
    report = boundary_report(model, ByteTokenizer(), text)
    assert report.marked.replace("|", "") == text  # never splits the two-byte "é"
    assert report.num_tokens == len(text.encode()) and 1 < report.num_boundaries < report.num_tokens
    assert report.marked.count("|") <= report.num_boundaries - 1
    assert 0.0 <= report.word_start_fraction <= 1.0
    # 9 spaces: 9 space positions + 9 word starts among the 42 positions after the first
    assert report.chance_fraction == pytest.approx(18 / (len(text.encode()) - 1))
    printed = mark_boundaries(model, ByteTokenizer(), text)
    assert printed.splitlines()[0] == report.marked and "space or word start (chance on this text" in printed
    with pytest.raises(SLMError):
        mark_boundaries(model, ByteTokenizer(), "")


def test_trainer_smoke_loss_falls(tmp_path):
    from simplified_slm.training import ExperimentConfig, Trainer

    cfg = tiny_experiment(tmp_path, max_steps=30, eval_every=30, sample_every=30, checkpoint_every=30,
                          eval_batches=2, sample_tokens=10)
    cfg["model"] = {"family": "hnet_bit", "preset": "tiny", "d_model": [32, 48], "main_layers": 1}
    cfg["tokenizer"] = {"kind": "byte"}
    result = Trainer(ExperimentConfig.from_dict(cfg), say=lambda m: None).run()
    assert result.step == 30
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.5, (first, last)
    loaded = CausalLM.from_pretrained(result.checkpoint)
    assert isinstance(loaded, HNetBitForCausalLM)


def test_build_from_registry():
    model = build_model({"family": "hnet_bit", "preset": "tiny"})
    assert isinstance(model, HNetBitForCausalLM) and model.num_parameters() > 0
