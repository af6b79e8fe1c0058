"""Teacher traces: deterministic greedy answers, batched == one by one, resumable output."""

import json

import pytest
import torch
import transformers

from conftest import family_model
from simplified_slm.data.chat import read_conversations
from simplified_slm.errors import SLMError
from simplified_slm.export.hf import export_hf
from simplified_slm.tokenizers import ByteTokenizer
from simplified_slm.training.traces import (OurTeacher, TraceSettings, TransformersTeacher, open_teacher,
                                            read_prompt_records, write_traces)

PROMPTS = ["2+2=", "Once upon a time", "a", "The quick brown fox jumps over", "7*6 is"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    family_model("llama").save_pretrained(folder, tokenizer=ByteTokenizer())
    return folder


def _prompts(path, extra=()):
    rows = [{"prompt": p} for p in PROMPTS] + [{"id": "chat", "messages": [{"role": "user", "content": "hi"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, *extra]))
    return read_prompt_records(path)


def _completions(out):
    return {row["id"]: row["completion"] for row in map(json.loads, out.read_text().splitlines())}


def test_greedy_traces_are_deterministic_and_batching_changes_nothing(teacher_dir, tmp_path):
    records = _prompts(tmp_path / "p.jsonl")
    teacher = open_teacher(teacher_dir, "cpu")
    assert isinstance(teacher, OurTeacher)
    outs = {}
    for batch in (1, 4, 4):
        out = tmp_path / f"t{len(outs)}.jsonl"
        write_traces(teacher, records, out, TraceSettings(max_new_tokens=12, batch_size=batch), "t", show_progress=False)
        outs[len(outs)] = _completions(out)
    assert outs[0] == outs[1] == outs[2]
    assert list(outs[0]) == [1, 2, 3, 4, 5, "chat"]
    # the answer is what the model says to the prompt alone
    ids = torch.tensor([list(PROMPTS[1].encode())])
    solo = teacher.model.generate(ids, 12, greedy=True)[0, ids.shape[1]:].tolist()
    assert outs[0][2] == ByteTokenizer().decode(solo)
    rows = [json.loads(line) for line in (tmp_path / "t0.jsonl").read_text().splitlines()]
    assert rows[0] == {"id": 1, "prompt": "2+2=", "completion": outs[0][1]}
    assert rows[-1] == {"id": "chat", "messages": [{"role": "user", "content": "hi"}], "completion": outs[0]["chat"]}
    conversations = read_conversations(tmp_path / "t0.jsonl")  # SFT data for the student as it stands
    assert conversations[0] == [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": outs[0][1]}]
    assert conversations[-1] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": outs[0]["chat"]}]


def test_a_killed_run_resumes_with_every_prompt_exactly_once(teacher_dir, tmp_path):
    records = _prompts(tmp_path / "p.jsonl")
    teacher = open_teacher(teacher_dir, "cpu")
    settings = TraceSettings(max_new_tokens=10, batch_size=2)
    whole = tmp_path / "whole.jsonl"
    write_traces(teacher, records, whole, settings, "t", show_progress=False)
    lines = whole.read_text().splitlines(keepends=True)
    cut = tmp_path / "cut.jsonl"  # two finished rows, then a third cut off mid-line by the kill
    cut.write_text("".join(lines[:2]) + lines[2][:len(lines[2]) // 2])
    (tmp_path / "cut.jsonl.settings.json").write_text((tmp_path / "whole.jsonl.settings.json").read_text())
    summary = write_traces(teacher, records, cut, settings, "t", show_progress=False)
    assert summary == {"out": str(cut), "prompts": 6, "written": 4, "kept": 2}
    ids = [json.loads(line)["id"] for line in cut.read_text().splitlines()]
    assert sorted(map(str, ids)) == sorted(map(str, [r["id"] for r in records]))  # each exactly once
    assert _completions(cut) == _completions(whole)
    with pytest.raises(SLMError, match="another teacher or other settings"):
        write_traces(teacher, records, cut, TraceSettings(max_new_tokens=11, batch_size=2), "t", show_progress=False)


def test_bad_prompt_lines_are_named(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(SLMError, match=r"p.jsonl:2 needs exactly one of"):
        read_prompt_records(path)


def test_an_architecture_we_cannot_import_runs_through_transformers(tmp_path):
    """A Qwen2 folder: its own tokenizer (the byte one exported with a tiny llama) and generate."""
    export_hf(family_model("llama"), tmp_path / "tok", ByteTokenizer())
    torch.manual_seed(0)
    # 260 ids: the bytes, and the end-of-text token Qwen2's tokenizer adds
    qwen = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128)).eval()
    qwen.save_pretrained(tmp_path / "qwen")
    for f in (tmp_path / "tok").glob("tokenizer*"):
        (tmp_path / "qwen" / f.name).write_bytes(f.read_bytes())
    teacher = open_teacher(tmp_path / "qwen", "cpu")
    assert isinstance(teacher, TransformersTeacher)
    records = _prompts(tmp_path / "p.jsonl")[:5]
    out = tmp_path / "t.jsonl"
    write_traces(teacher, records, out, TraceSettings(max_new_tokens=8, batch_size=5), "q", show_progress=False)
    got = _completions(out)
    for record in records:  # left-padded batch == each prompt alone
        ids = teacher.tokenizer(record["prompt"], return_tensors="pt", add_special_tokens=False)
        alone = qwen.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].shape[1]:]
        assert got[record["id"]] == teacher.tokenizer.decode(alone, skip_special_tokens=True)
