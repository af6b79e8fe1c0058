"""LoRA through peft: only adapters train, the loss falls, checkpoints are peft's format, resume is exact."""

import json

import peft
import pytest
import torch

from conftest import family_model, tiny_experiment
from simplified_slm.errors import SLMError
from simplified_slm.models import CausalLM, load
from simplified_slm.training.config import ExperimentConfig, TrainConfig
from simplified_slm.layers.quantized import QuantizedEmbedding, QuantizedLinear
from simplified_slm.models.quantization import quantize_in_place
from simplified_slm.ops import quant_native
from simplified_slm.training.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_QUANTIZATION, LoraSettings,
                                          adapter_tensors, attach_lora, lora_layers, merge_lora,
                                          quantize_base_as_recorded)
from simplified_slm.training.optim import build_optimizer
from simplified_slm.training.step import StepSetup, TrainState, model_loss, train_step
from simplified_slm.tokenizers import ByteTokenizer
from simplified_slm.training.trainer import Trainer


def _scaled_head(model: CausalLM) -> CausalLM:
    with torch.no_grad():  # a head with a trained one's scale (at init every output is near uniform)
        model.lm_head.weight.normal_(0, 0.3)
    return model


def _adapters_memorise_one_batch(model: CausalLM) -> CausalLM:
    """Adapters on `model`, trained on one batch: only they are optimised, the loss falls, and
    the base (float or packed) stays bit-identical. Returns the adapted model."""
    base = {k: v.clone() for k, v in model.state_dict().items()}
    model = attach_lora(model.train(), LoraSettings(r=8, alpha=16))
    lora = {id(t) for pair in adapter_tensors(model).values() for t in pair}
    assert all(t.dtype == torch.float32 for pair in adapter_tensors(model).values() for t in pair)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.0))
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == lora
    setup = StepSetup(loss_fn=model_loss(model), forward=model, params=list(model.parameters()),
                      device=torch.device("cpu"))
    state = TrainState(model, optimizer, "test")
    torch.manual_seed(0)
    x = torch.randint(0, 16, (4, 16))
    batch = (x, torch.roll(x, -1, 1))  # memorise one batch
    losses = [train_step(state, [batch], setup).loss for _ in range(30)]
    assert losses[-1] < 0.4 * losses[0], losses
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert after.keys() == base.keys()
    assert all(torch.equal(after[k], base[k]) for k in base)  # the base is bit-identical
    return model


@pytest.mark.parametrize("family", ["llama", "bitnet"])
def test_only_adapters_train_and_the_loss_falls(family):
    _adapters_memorise_one_batch(_scaled_head(family_model(family)))


def test_a_target_that_matches_nothing_names_the_available_modules():
    with pytest.raises(SLMError, match=r"'qkv' matches no Linear.*available: .*down_proj.*q_proj"):
        attach_lora(family_model("llama"), LoraSettings(target_modules=["q_proj", "qkv"]))


def test_merge_equals_the_adapter_and_ternary_layers_refuse_it():
    model = attach_lora(family_model("gpt"), LoraSettings(r=4, alpha=8)).eval()
    with torch.no_grad():
        for _, b in adapter_tensors(model).values():
            b.normal_(0, 0.1)
    x = torch.randint(0, 256, (2, 10))
    adapted = model(x).logits
    merged = merge_lora(model)
    assert not any("lora" in name for name, _ in merged.named_modules())
    torch.testing.assert_close(merged(x).logits, adapted, atol=1e-5, rtol=0)
    with pytest.raises(SLMError, match="BitLinear"):
        merge_lora(attach_lora(family_model("bitnet"), LoraSettings()))


def _lora_config(out, **train):
    cfg = tiny_experiment(out, max_steps=30, lr=1e-2, min_lr=1e-3, eval_every=15, sample_every=100,
                          checkpoint_every=10, **train)
    cfg["model"]["dropout"] = 0.0
    cfg["train"]["lora"] = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj"]}
    return ExperimentConfig.from_dict(cfg)


def test_a_lora_run_checkpoints_peft_adapters_and_resumes_exactly(tmp_path):
    whole = Trainer(_lora_config(tmp_path / "whole")).run()
    Trainer(_lora_config(tmp_path / "split"), until=20).run()
    resumed = Trainer(_lora_config(tmp_path / "split"), resume="auto").run()
    assert resumed.losses == whole.losses[20:]  # adapter, optimizer and RNGs restored bit for bit

    ckpt = whole.checkpoint
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS} <= {p.name for p in ckpt.iterdir()}
    assert not (ckpt / "model.safetensors").exists()  # only the adapter is saved
    base_path = json.loads((ckpt / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    assert base_path == str((tmp_path / "whole" / "base").resolve())
    ours = load(ckpt).model  # models.load: base + adapter
    x = torch.randint(0, ours.config.vocab_size, (2, 12))
    # peft's own loader puts the checkpoint onto our base model with the same result
    theirs = peft.PeftModel.from_pretrained(CausalLM.from_pretrained(base_path), str(ckpt)).eval()
    torch.testing.assert_close(theirs(input_ids=x).logits, ours(x).logits, atol=1e-6, rtol=0)
    base = CausalLM.from_pretrained(base_path).eval()
    assert (base(x).logits - ours(x).logits).abs().max() > 1e-3  # the adapter learned something


def test_resuming_a_lora_checkpoint_without_lora_is_refused(tmp_path):
    Trainer(_lora_config(tmp_path / "run"), until=10).run()
    plain = _lora_config(tmp_path / "run").replace(train=_lora_config(tmp_path / "run").train.replace(lora=None))
    with pytest.raises(SLMError, match="LoRA adapter but this run does not use train.lora"):
        Trainer(plain, resume="auto").run()


def test_a_lora_run_from_pretrained_weights_points_its_adapter_at_them(tmp_path):
    source = tmp_path / "pretrained"
    family_model("llama").save_pretrained(source, tokenizer=ByteTokenizer())

    def config():
        cfg = tiny_experiment(tmp_path / "run", max_steps=12, eval_every=12, sample_every=100, checkpoint_every=6)
        del cfg["model"], cfg["tokenizer"]  # the source's
        cfg["train"].update(init_from=str(source), lora={"r": 4, "alpha": 8})
        return ExperimentConfig.from_dict(cfg)

    Trainer(config(), until=6).run()
    result = Trainer(config(), resume="auto").run()  # the base is re-read from the source
    assert result.step == 12 and not (tmp_path / "run" / "base").exists()
    adapter = json.loads((result.checkpoint / ADAPTER_CONFIG).read_text())
    assert adapter["base_model_name_or_path"] == str(source.resolve())
    pretrained = CausalLM.from_pretrained(source)
    adapted = load(result.checkpoint).model
    frozen = {k.replace(".base_layer", ""): v for k, v in adapted.state_dict().items() if "lora_" not in k}
    assert frozen.keys() == pretrained.state_dict().keys()
    assert all(torch.equal(frozen[k], v) for k, v in pretrained.state_dict().items())  # the source's weights


@pytest.mark.parametrize("scheme", ["int4", "bf16"])
def test_qlora_trains_float_adapters_over_a_packed_base(scheme):
    model = _scaled_head(family_model("llama", intermediate_size=256))  # a width the 32-groups divide
    model = _adapters_memorise_one_batch(quantize_in_place(model, scheme))
    adapted = lora_layers(model)
    assert adapted and all(isinstance(layer.get_base_layer(), QuantizedLinear) for layer in adapted.values())

    # merged: the dequantized base with the adapter folded in, the same function in float32
    # (more rows than SMALL_BATCH: there the packed base multiplies in float too, not int8 activations)
    model.eval()
    x = torch.randint(0, 256, (quant_native.SMALL_BATCH // 10 + 1, 10))
    with torch.no_grad():
        want = model(x).logits
    merged = merge_lora(model)
    assert not any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in merged.modules())
    torch.testing.assert_close(merged(x).logits, want, atol=1e-4, rtol=0)


def test_a_qlora_run_resumes_exactly_and_loads_with_its_base_quantized(tmp_path):
    def config(out):
        cfg = _lora_config(out)
        return cfg.replace(train=cfg.train.replace(lora=cfg.train.lora.replace(quantize_base="int4")))

    whole = Trainer(config(tmp_path / "whole")).run()
    Trainer(config(tmp_path / "split"), until=20).run()
    resumed = Trainer(config(tmp_path / "split"), resume="auto").run()
    assert resumed.losses == whole.losses[20:]

    ckpt = whole.checkpoint
    assert json.loads((ckpt / BASE_QUANTIZATION).read_text())["modules"]["lm_head"]["scheme"] == "q4_1"
    loaded = load(ckpt).model
    assert all(isinstance(layer.get_base_layer(), QuantizedLinear) for layer in lora_layers(loaded).values())
    # the same function as float base + adapter, up to 4-bit rounding; and merged exactly
    float_base = peft.PeftModel.from_pretrained(CausalLM.from_pretrained(whole.checkpoint.parent.parent / "base"),
                                                str(ckpt)).eval()
    x = torch.randint(0, loaded.config.vocab_size, (quant_native.SMALL_BATCH // 12 + 1, 12))  # float numerics
    with torch.no_grad():
        got = loaded(x).logits
        assert 0 < (got - float_base(input_ids=x).logits).abs().max() < 0.5
    torch.testing.assert_close(merge_lora(loaded)(x).logits, got, atol=1e-4, rtol=0)


def test_quantize_base_names_the_bad_scheme():
    with pytest.raises(SLMError, match="quantize_base.*unknown quantization scheme 'int3'"):
        LoraSettings(quantize_base="int3").validate()
    with pytest.raises(SLMError, match="quantize_base.*means float32"):
        LoraSettings(quantize_base="none").validate()
    with pytest.raises(SLMError, match=r"quantize_group_size: must be one of \(32, 64, 128\), got 256"):
        LoraSettings(quantize_base="int4", quantize_group_size=256).validate()  # what the packed layers take


def test_a_recorded_base_it_cannot_rebuild_is_one_line():
    model = family_model("llama", intermediate_size=256)
    two_schemes = {"lm_head": {"scheme": "q4_1", "group_size": 32},
                   "layers.0.mlp.up_proj": {"scheme": "q8_0", "group_size": 32}}
    for record in ({}, two_schemes):  # an emptied file, and a mix one quantize_in_place cannot make
        with pytest.raises(SLMError, match="base_quantization.json records a quantized LoRA base this model cannot"):
            quantize_base_as_recorded(model, record, "run/base_quantization.json")
