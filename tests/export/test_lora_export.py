"""A LoRA adapter trained here loads with peft onto the transformers export; merging equals the adapter."""

import json

import peft
import pytest
import torch
import transformers

from conftest import family_model, tiny_experiment
from simplified_slm.cli.main import main
from simplified_slm.errors import SLMError
from simplified_slm.export.hf import export_hf
from simplified_slm.export.lora import prepare_export
from simplified_slm.models import load
from simplified_slm.training.config import ExperimentConfig
from simplified_slm.training.lora import LoraSettings, adapter_tensors, attach_lora
from simplified_slm.training.trainer import Trainer


def _adapted(family, targets=None):
    model = attach_lora(family_model(family), LoraSettings(r=4, alpha=8, target_modules=targets))
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero; give the adapter something to say
        for _, b in adapter_tensors(model).values():
            b.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize("family,targets", [("llama", None), ("gpt", None), ("gpt", ["q_proj", "v_proj", "down_proj"])])
def test_peft_puts_our_adapter_onto_the_transformers_export(tmp_path, family, targets):
    model = _adapted(family, targets)
    x = torch.randint(0, 256, (2, 12))
    ours = model(x).logits
    base, write_adapter = prepare_export(model, "hf", merge=False)
    export_hf(base, tmp_path)
    info = write_adapter(tmp_path, tmp_path)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path.resolve()) and info["adapter"].endswith("adapter")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        plain = hf(x).logits
        theirs = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()(x).logits
    assert (theirs - ours).abs().max() < 1e-4
    assert (plain - ours).abs().max() > 1e-2  # the adapter is really applied there


def _lora_checkpoint(tmp_path):
    cfg = tiny_experiment(tmp_path / "run", max_steps=10, lr=1e-2, eval_every=10, sample_every=100,
                          checkpoint_every=10)
    cfg["model"] = {"family": "llama", "preset": "tiny"}
    cfg["tokenizer"] = {"kind": "byte"}
    cfg["train"]["lora"] = {"r": 4, "alpha": 8}
    return Trainer(ExperimentConfig.from_dict(cfg)).run().checkpoint


def test_slm_export_merges_or_keeps_the_adapter(tmp_path, capsys):
    ckpt = _lora_checkpoint(tmp_path)
    adapted = load(ckpt).model
    x = torch.randint(0, 256, (2, 12))
    ours = adapted(x).logits
    assert main(["export", "--checkpoint", str(ckpt), "--format", "hf", "--merge-lora",
                 "--out", str(tmp_path / "merged")]) == 0
    assert main(["export", "--checkpoint", str(ckpt), "--format", "hf", "--out", str(tmp_path / "split")]) == 0
    assert main(["export", "--checkpoint", str(ckpt), "--format", "safetensors", "--merge-lora",
                 "--out", str(tmp_path / "ours")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "split")).eval()
    with torch.no_grad():
        split = peft.PeftModel.from_pretrained(base, str(tmp_path / "split" / "adapter")).eval()(x).logits
        assert (merged(x).logits - ours).abs().max() < 1e-4
        assert (split - ours).abs().max() < 1e-4
        assert (load(tmp_path / "ours").model(x).logits - ours).abs().max() < 1e-4
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "o")]) == 2
    assert "only with --merge-lora" in capsys.readouterr().err


def test_merge_lora_on_a_plain_model_is_refused():
    with pytest.raises(SLMError, match="holds no LoRA adapter"):
        prepare_export(family_model("gpt"), "hf", merge=True)
