"""Packed ternary export: 2-bit weights, >= 7.5x smaller than fp16, same logits and tokens."""

import json

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
