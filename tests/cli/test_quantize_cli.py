"""`slm quantize` and `--quantize` / `--kv-cache-dtype` on the inference commands."""

import json

import pytest
import torch

from simplified_slm.cli.main import main
from simplified_slm.layers.quantized import QuantizedLinear
from simplified_slm.models import CausalLM, LlamaConfig, LlamaForCausalLM, load
from simplified_slm.tokenizers import ByteTokenizer


@pytest.fixture
def float_folder(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.preset("tiny", intermediate_size=128))
    model.save_pretrained(tmp_path / "float", tokenizer=ByteTokenizer())
    return tmp_path / "float"


def test_quantize_writes_a_loadable_folder(float_folder, tmp_path, capsys):
    out = tmp_path / "q4"
    assert main(["quantize", "--model_path", str(float_folder), "--out", str(out), "--scheme", "int4",
                 "--group-size", "64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["scheme"] == "q4_1 (g64)" and report["weight_bytes"] < 0.3 * 4 * 60_000
    model, _, _ = load(out)
    assert model.layers[0].mlp.up_proj.scheme == "q4_1" and model.layers[0].mlp.up_proj.group_size == 64
    assert isinstance(CausalLM.from_pretrained(out).lm_head, QuantizedLinear)
    # the output is checked before any work, and never half written
    assert main(["quantize", "--model_path", str(float_folder), "--out", str(out), "--scheme", "int8"]) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert main(["quantize", "--model_path", str(float_folder), "--out", str(out), "--scheme", "int8",
                 "--overwrite"]) == 0
    assert load(out).model.layers[0].mlp.up_proj.scheme == "q8_0"


def test_generate_and_eval_quantize_on_load(float_folder, tmp_path, capsys):
    common = ["--model_path", str(float_folder), "--prompt", "ab", "--max_tokens", "6", "--greedy", "--device", "cpu"]
    assert main(["generate", *common]) == 0
    fp32 = capsys.readouterr().out
    assert main(["generate", *common, "--quantize", "bf16", "--kv-cache-dtype", "bf16"]) == 0
    assert capsys.readouterr().out.startswith("ab")
    text = tmp_path / "text.txt"
    text.write_text("hello world, " * 40)
    assert main(["eval", "--checkpoint", str(float_folder), "--dataset", str(text), "--quantize", "int8",
                 "--samples", "0", "--block_size", "32", "--device", "cpu"]) == 0
    assert "bpb" in capsys.readouterr().out
    assert fp32.startswith("ab")


def test_quantize_cli_errors(float_folder, tmp_path, capsys):
    assert main(["quantize", "--model_path", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
                 "--scheme", "int8"]) == 2
    assert "does not exist" in capsys.readouterr().err
    torch.manual_seed(0)
    odd = tmp_path / "odd"
    LlamaForCausalLM(LlamaConfig.preset("tiny")).save_pretrained(odd, tokenizer=ByteTokenizer())
    assert main(["quantize", "--model_path", str(odd), "--out", str(tmp_path / "o"), "--scheme", "int4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "in_features 176 is not divisible by group size 32" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        main(["quantize", "--model_path", str(odd), "--out", str(tmp_path / "o"), "--scheme", "int3"])
