"""Packed ternary export: 2-bit weights, >= 7.5x smaller than fp16, same logits and tokens."""

import json

import pytest
import torch

from simplified_slm.cli.main import main
from simplified_slm.export.ternary import PACKED_FILE, load_packed, save_packed
from simplified_slm.models import SimplifiedSLMConfig, SimplifiedSLMForCausalLM
from simplified_slm.utils import ByteTokenizer


def test_packed_round_trip(tmp_path):
    torch.manual_seed(0)
    model = SimplifiedSLMForCausalLM(SimplifiedSLMConfig(hidden_size=64, num_hidden_layers=2)).eval()
    info = save_packed(model, tmp_path)
    assert info["linear_weights_fp16_bytes"] / info["linear_weights_packed_bytes"] >= 7.5
    ids = torch.randint(0, 256, (2, 24))
    for int8 in (False, True):
        packed = load_packed(tmp_path, int8=int8)
        assert (packed(ids).logits - model(ids).logits).abs().max() <= 1e-5
        assert torch.equal(packed.generate(ids, 16, greedy=True), model.generate(ids, 16, greedy=True))


def test_cli_export_and_generate_from_packed(tmp_path, capsys):
    torch.manual_seed(0)
    model = SimplifiedSLMForCausalLM(SimplifiedSLMConfig(hidden_size=32, num_hidden_layers=1))
    model.save_pretrained(tmp_path / "float", tokenizer=ByteTokenizer())
    assert main(["export", "--checkpoint", str(tmp_path / "float"), "--format", "ternary",
                 "--out", str(tmp_path / "packed")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["linear_weights_vs_fp16"] >= 7.5 and (tmp_path / "packed" / PACKED_FILE).is_file()
    assert main(["generate", "--model_path", str(tmp_path / "packed"), "--prompt", "hi", "--greedy",
                 "--max_tokens", "8"]) == 0
    packed_out = capsys.readouterr().out
    assert main(["generate", "--model_path", str(tmp_path / "float"), "--prompt", "hi", "--greedy",
                 "--max_tokens", "8"]) == 0
    assert capsys.readouterr().out == packed_out


def _tied_bitnet():
    """Float lm_head sharing the embedding: stored once, as embed_tokens.weight."""
    from simplified_slm.models.bitnet import BitNetConfig, BitNetForCausalLM

    model = BitNetForCausalLM(BitNetConfig.preset("tiny", vocab_size=256, tie_word_embeddings=True))
    return model, lambda m: m.embed_tokens.weight is m.lm_head.weight


def _tied_hgrn_bit():
    """A BitLinear lm_head sharing the embedding: packed codes for the head, float embedding."""
    model = SimplifiedSLMForCausalLM(SimplifiedSLMConfig(hidden_size=32, num_hidden_layers=1,
                                                         tie_word_embeddings=True))
    return model, lambda m: m.lm_head.weight is None or m.lm_head.weight is m.embeddings.weight


@pytest.mark.parametrize("build", [_tied_bitnet, _tied_hgrn_bit], ids=["bitnet", "hgrn_bit"])
def test_tied_embeddings_export_load_and_generate(tmp_path, capsys, build):
    """save_packed writes a tied tensor once; loading must fill the lm_head from it."""
    torch.manual_seed(0)
    model, tied = build()
    model.eval()
    assert tied(model) and model.lm_head.weight is not None
    model.save_pretrained(tmp_path / "float", tokenizer=ByteTokenizer())
    assert main(["export", "--checkpoint", str(tmp_path / "float"), "--format", "ternary",
                 "--out", str(tmp_path / "packed")]) == 0
    capsys.readouterr()
    ids = torch.randint(0, 256, (2, 20))
    for int8 in (False, True):
        packed = load_packed(tmp_path / "packed", int8=int8)
        assert tied(packed)
        with torch.no_grad():
            assert (packed(ids).logits - model(ids).logits).abs().max() <= 1e-5
    outputs = []
    for folder in ("packed", "float"):
        assert main(["generate", "--model_path", str(tmp_path / folder), "--prompt", "Once", "--greedy",
                     "--max_tokens", "12"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("Once")


def test_ternary_export_of_a_float_family_is_one_line(tmp_path, capsys):
    from simplified_slm.models.llama import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig.preset("tiny", vocab_size=256)).save_pretrained(tmp_path / "llama",
                                                                                 tokenizer=ByteTokenizer())
    assert main(["export", "--checkpoint", str(tmp_path / "llama"), "--format", "ternary",
                 "--out", str(tmp_path / "packed")]) == 2
    assert "no BitLinear layers" in capsys.readouterr().err
