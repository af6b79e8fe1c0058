"""Edge exports: ONNX files run in onnxruntime with PyTorch's logits at any batch and length;
Core ML packages convert with the expected structure and spec (running them needs macOS)."""

import json
import sys

import onnxruntime as ort  # a dev dependency (the `edge` extra)
import pytest
import torch

from simplified_slm.cli.main import main
from simplified_slm.errors import SLMError
from simplified_slm.export.coreml import COREML_FILE, export_coreml
from simplified_slm.export.onnx import EDGE_INSTALL, ONNX_FILE, export_onnx, inference_copy
from simplified_slm.models import GPTConfig, build_model
from simplified_slm.models.bitnet import BitNetConfig
from simplified_slm.models.hgrn_bit import SimplifiedSLMConfig
from simplified_slm.models.hnet_bit import HNetBitConfig
from simplified_slm.models.llama import LlamaConfig
from simplified_slm.training.checkpoint import write_manifest
from simplified_slm.utils import ByteTokenizer

_GQA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, vocab_size=96)
CONFIGS = {
    "gpt": lambda: GPTConfig(vocab_size=256, n_layers=1, d_model=32, n_heads=4, context_length=40, dropout=0.0),
    "llama": lambda: LlamaConfig(**_GQA),
    "bitnet": lambda: BitNetConfig(**_GQA),
    # two layers: the second has a non-zero forget-gate lower bound
    "hgrn_bit": lambda: SimplifiedSLMConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, intermediate_size=64),
}
SHAPES = [(1, 1), (1, 5), (3, 29)]  # none is the traced (2, 8): one file, any batch and length


def _tiny(family):
    torch.manual_seed(0)
    return build_model(CONFIGS[family]()).eval()


def _onnx_minus(path, model):
    """onnxruntime logits minus `model`'s, one (batch, seq, vocab) tensor per SHAPES entry, after checking the I/O."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, out.name) == ("input_ids", "tensor(int64)", "logits")
    assert all(isinstance(d, str) for d in inp.shape)  # batch and length are symbolic
    diffs = []
    with torch.no_grad():
        for shape in SHAPES:
            ids = torch.randint(0, model.config.vocab_size, shape)
            logits = torch.from_numpy(session.run(["logits"], {"input_ids": ids.numpy()})[0])
            assert logits.shape == (*shape, model.config.vocab_size)
            diffs.append(logits - model(ids).logits)
    return diffs


@pytest.mark.parametrize("family", ["llama", "bitnet", "hgrn_bit"])
def test_onnx_logits_match_pytorch(tmp_path, family):
    model = _tiny(family)
    info = export_onnx(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ONNX_FILE]  # one self-contained file
    if family == "llama":  # float weights: equal to the model as trained (SDPA attention)
        assert info["max_abs_diff"] <= 1e-4
        diffs = _onnx_minus(tmp_path / ONNX_FILE, model)
        assert max(d.abs().max().item() for d in diffs) <= 1e-4
        return
    # Ternary families quantise activations to int8 levels per token, so an ulp-level
    # difference between onnxruntime's and PyTorch's kernels moves a value that sits on a
    # rounding boundary by one level (1/127 of the token's max), and that token's logits
    # (with hgrn_bit, the recurrence's later ones too) by ~1e-3. Measured against the form the
    # graph computes (frozen codes, eager attention), the other positions must match.
    diffs = _onnx_minus(tmp_path / ONNX_FILE, inference_copy(model))
    per_position = torch.cat([d.abs().amax(-1).flatten() for d in diffs])
    assert (per_position <= 1e-4).float().mean() >= 0.9, per_position.max()
    assert per_position.max() <= 0.05


def test_cli_exports_a_checkpoint_to_onnx(tmp_path, capsys):
    model = _tiny("gpt")
    checkpoint = tmp_path / "step_00000001"
    model.save_pretrained(checkpoint, tokenizer=ByteTokenizer())
    write_manifest(checkpoint)  # a training checkpoint: the CLI verifies it before loading
    out = tmp_path / "onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "onnx" and report["max_abs_diff"] <= 1e-4
    assert (out / "tokenizer_config.json").is_file()  # the ids' meaning travels with the graph
    diffs = _onnx_minus(out / ONNX_FILE, model)
    assert max(d.abs().max().item() for d in diffs) <= 1e-4


def test_coreml_package_and_spec(tmp_path):
    import coremltools as ct  # a dev dependency; imported here because it is slow and chatty

    model = _tiny("llama")  # grouped-query attention: the case coremltools' SDPA converter misses
    info = export_coreml(model, tmp_path, max_batch=4)
    assert info["program_max_abs_diff"] <= 1e-4
    package = tmp_path / COREML_FILE
    manifest = json.loads((package / "Manifest.json").read_text())
    assert {e["path"] for e in manifest["itemInfoEntries"].values()} == {
        "com.apple.CoreML/model.mlmodel", "com.apple.CoreML/weights"}
    data = package / "Data" / "com.apple.CoreML"
    assert (data / "model.mlmodel").is_file() and (data / "weights" / "weight.bin").stat().st_size > 0
    spec = ct.utils.load_spec(str(package))
    assert spec.WhichOneof("Type") == "mlProgram"
    (inp,), (out,) = spec.description.input, spec.description.output
    assert (inp.name, out.name) == ("input_ids", "logits")
    assert inp.type.multiArrayType.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.INT32
    bounds = [(r.lowerBound, r.upperBound) for r in inp.type.multiArrayType.shapeRange.sizeRanges]
    assert bounds == [(1, 4), (1, 64)]  # max_batch; max_position_embeddings
    assert out.type.multiArrayType.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    assert "FLOAT16" not in str(spec.mlProgram)  # float32 compute precision, for parity


REFUSED = {
    "hgrn_bit": lambda: _tiny("hgrn_bit"),
    "hnet_bit": lambda: build_model(HNetBitConfig.preset("tiny")),
    "dynamic-rope llama": lambda: build_model(LlamaConfig(**_GQA, rope_scaling={"rope_type": "dynamic",
                                                                                 "factor": 2.0})),
}


@pytest.mark.parametrize("fmt,model,needle", [
    ("coreml", "hgrn_bit", "--format onnx"),
    ("onnx", "hnet_bit", "data-dependent number of chunks"),
    ("onnx", "dynamic-rope llama", "dynamic \\(NTK\\) RoPE"),
])
def test_unexportable_models_are_refused_with_the_reason(tmp_path, fmt, model, needle):
    export = export_onnx if fmt == "onnx" else export_coreml
    with pytest.raises(SLMError, match=needle):
        export(REFUSED[model](), tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("fmt,package", [("onnx", "onnxruntime"), ("coreml", "coremltools")])
def test_missing_edge_packages_name_the_extra(tmp_path, monkeypatch, capsys, fmt, package):
    _tiny("gpt").save_pretrained(tmp_path / "model", tokenizer=ByteTokenizer())
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` raise ImportError
    assert main(["export", "--checkpoint", str(tmp_path / "model"), "--format", fmt,
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and package in err and EDGE_INSTALL in err
