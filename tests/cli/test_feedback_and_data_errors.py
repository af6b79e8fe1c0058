"""What a user sees during long work and when data or configs are wrong, as they see it:
`slm` in a fresh process with stderr piped (a log file, CI), not a terminal.

- feedback: progress as whole lines (no carriage-return redraws), the console logger's
  line per log step, progress while tokenizing data and learning a tokenizer;
- errors that say what is wrong: a text field that exists but is not a string, config parse
  errors with their line and column;
- `data.on_error: skip` leaves out the bad line or byte span, not the file, and says so in
  one `warning:` line per file.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from simplified_slm.data import read_documents
from simplified_slm.errors import SLMError


def slm(*args: str, cwd: Path | None = None, interval: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    if interval is not None:
        env["SLM_PROGRESS_INTERVAL"] = interval
    return subprocess.run([sys.executable, "-m", "simplified_slm.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO / "src"), **env},
                          capture_output=True, text=True, timeout=60)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# --- feedback on long work ---------------------------------------------------------------

PROGRESS_SCRIPT = """
from simplified_slm.utils.progress import progress
bar = progress(total=4, initial=1, desc="train", unit="step")
print(type(bar).__name__)
for step in range(3):
    bar.set_postfix(loss=f"{2.0 - step:.4f}")
    bar.update(1)
bar.close()
"""


def test_progress_off_a_terminal_is_whole_lines():
    result = python(PROGRESS_SCRIPT, SLM_PROGRESS_INTERVAL="0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "LineProgress"
    assert "\r" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 3, lines  # one per update at interval 0, nothing again on close
    assert lines[0].startswith("train: 2/4 step (50%), ") and lines[0].endswith("loss=2.0000"), lines
    assert lines[-1].startswith("train: 4/4 step (100%), ") and "elapsed" in lines[-1], lines


def test_progress_off_a_terminal_is_quiet_for_short_work():
    result = python(PROGRESS_SCRIPT)  # default interval (10 s): the work is over long before
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_progress_on_a_terminal_is_tqdm():
    leader, follower = pty.openpty()
    try:
        result = subprocess.run([sys.executable, "-c", PROGRESS_SCRIPT], stderr=follower, stdout=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": str(REPO / "src")}, text=True, timeout=60)
    finally:
        os.close(follower)
        os.close(leader)
    assert result.returncode == 0 and result.stdout.strip() == "tqdm"


def test_training_prints_loss_lr_and_throughput_per_log_step(tmp_path):
    result = slm("train", "--config", str(REPO / "configs" / "tiny_test.json"), "--output_dir",
                 str(tmp_path / "run"), "--set", "train.max_steps=10", "--set", "train.eval_every=10",
                 "--set", "train.sample_every=10", "--set", "train.checkpoint_every=10")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    for step in (5, 10):
        train = [line for line in lines if line.startswith(f"step {step}: loss ")]
        assert len(train) == 1, lines
        words = train[0].split()
        assert words[4] == "lr" and float(words[5]) > 0 and words[6] == "tok/s", train
        assert float(words[3]) > 0 and float(words[7].replace(",", "")) > 0, train
    assert any(line.startswith("step 10: val/loss ") and "val/bpb" in line for line in lines), lines
    assert "\r" not in result.stderr


def test_tokenizer_reading_and_data_tokenization_report_bytes_and_documents(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.txt").write_text(f"document {i}\n" * 2000)
    result = slm("prepare", "--config", str(REPO / "configs" / "tiny_test.json"), "--set", f"data.dataset={corpus}",
                 "--set", "data.max_train_bytes=null", "--set", "tokenizer.char_policy=corpus",
                 "--out", str(tmp_path / "data"), interval="0")
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr
    lines = result.stderr.splitlines()
    reading = [line for line in lines if line.startswith("tokenizer (char): reading text: ")]
    assert reading and "documents=3" in reading[-1] and "kB" in reading[-1], lines
    train = [line for line in lines if line.startswith("tokenizing train: ")]
    assert train and "documents=1/3" in train[0] and "documents=3/3" in train[-1], lines
    assert "(100%)" in train[-1] and "B/s" in train[-1]
    assert any(line.startswith("tokenizing val: ") for line in lines)


def test_bpe_training_keeps_time_while_the_library_works(tmp_path):
    result = slm("tokenizer", "train", "--kind", "bpe", "--vocab-size", "300", "--data", "tinyshakespeare",
                 "--out", str(tmp_path / "tok"), interval="0.02")
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("tokenizer (bpe): learning a 300-token vocab: ") and lines[0].endswith(" elapsed"), lines
    assert lines[-1].startswith("tokenizer (bpe): learning a 300-token vocab: done in "), lines


# --- errors that say what is wrong -------------------------------------------------------

@pytest.mark.parametrize("value,says", [
    (12345, "it is a number (12345)"), (None, "it is null"), (["a", "b"], "it is an array"),
    ({"en": "hi"}, "it is an object"), (True, "it is a boolean"),
])
def test_a_text_field_that_is_not_a_string_says_what_it_is(tmp_path, value, says):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": value}) + "\n")
    with pytest.raises(SLMError) as caught:
        list(read_documents(path))
    message = str(caught.value)
    assert f"line 2 has a 'text' field, but {says}" in message and "found:" not in message, message


def test_non_object_lines_and_json_records_are_named(tmp_path):
    lines = tmp_path / "data.jsonl"
    lines.write_text('{"text": "fine"}\n[1, 2]\n')
    with pytest.raises(SLMError, match=r"data\.jsonl: line 2 is an array, not an object"):
        list(read_documents(lines))
    records = tmp_path / "data.json"
    records.write_text(json.dumps([{"text": "fine"}, {"body": "other"}]))
    with pytest.raises(SLMError, match=r"data\.json: record 1 has no 'text' field \(found: body\)"):
        list(read_documents(records))


def test_cli_names_the_number_in_a_jsonl_text_field(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "some text here"}\n{"text": 12345}\n')
    line = one_error_line(slm("prepare", "--config", str(REPO / "configs" / "tiny_test.json"),
                              "--set", f"data.dataset={path}", "--set", "tokenizer.kind=byte",
                              "--out", str(tmp_path / "out")))
    assert "line 2 has a 'text' field, but it is a number (12345), not a string" in line
    assert "on_error='skip'" in line


@pytest.mark.parametrize("text,where", [
    ("model:\n  family: gpt\n  n_layers: 2\n train:\n   lr: 1\n", "line 4, column 2: expected <block end>"),
    ("train:\n  loggers: [csv, console\n  lr: 1\n", "line 3, column 5: expected ',' or ']'"),
    ("train:\n\tlr: 1\n", "line 2, column 1: found character '\\t' that cannot start any token"),
])
def test_yaml_parse_errors_keep_line_and_column(tmp_path, text, where):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    line = one_error_line(slm("train", "--config", str(path)))
    assert line.startswith(f"error: cannot parse config {path}: {where}"), line


def test_json_parse_errors_and_broken_set_lists_keep_the_position(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text('{"train": {\n  "lr": 1\n  "max_steps": 3}}')
    line = one_error_line(slm("train", "--config", str(path)))
    assert f"cannot parse config {path}: line 3, column 3: Expecting ',' delimiter" in line
    line = one_error_line(slm("train", "--set", "train.loggers=[csv, console"))
    assert "override 'train.loggers=[csv, console': the value is not valid YAML (line 1, column 14" in line


# --- on_error: skip leaves out the bad part, not the file ---------------------------------

def test_skip_mode_keeps_the_good_lines_and_bytes_and_says_what_it_left_out(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    records = [json.dumps({"text": f"good record {i}."}) for i in range(9)]
    records[2] = '{"text": "truncated'
    records[5] = json.dumps({"text": 12345})
    records[7] = "not json at all"
    (corpus / "a.jsonl").write_text("\n".join(records) + "\n")
    (corpus / "b.txt").write_bytes(b"caf\xe9 and \xff\xfe\xfd text " * 50)
    (corpus / "c.txt").write_text("a clean file\n" * 200)
    out = tmp_path / "out"
    result = slm("prepare", "--config", str(REPO / "configs" / "tiny_test.json"), "--set", f"data.dataset={corpus}",
                 "--set", "data.extensions=[.jsonl, .txt]", "--set", "data.on_error=skip",
                 "--set", "data.max_train_bytes=null", "--set", "tokenizer.kind=byte", "--out", str(out))
    assert result.returncode == 0, result.stderr
    warnings = result.stderr.splitlines()
    assert warnings == [
        f"warning: skipped 3 of 9 lines in {corpus / 'a.jsonl'} (2 not JSON, 1 'text' is a number)",
        f"warning: skipped 200 of {len(b'caf? and ??? text ') * 50} bytes in {corpus / 'b.txt'} (not UTF-8)",
    ], result.stderr
    good = [f"good record {i}." for i in (0, 1, 3, 4, 6, 8)] + ["caf and  text " * 50] + ["a clean file\n" * 200]
    meta = json.loads((out / "meta.json").read_text())
    total = sum(split["bytes"] for split in meta["splits"].values())
    assert total == sum(len(text.encode()) for text in good)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] >= len(good)


def test_skip_mode_still_leaves_out_a_binary_file_whole_in_one_line(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("kept text\n" * 20)
    (corpus / "blob.txt").write_bytes(b"\x89PNG\x00\x00 binary")
    result = slm("prepare", "--config", str(REPO / "configs" / "tiny_test.json"), "--set", f"data.dataset={corpus}",
                 "--set", "data.on_error=skip", "--set", "tokenizer.kind=byte", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"warning: skipped {corpus / 'blob.txt'}: looks binary (NUL byte at offset 4)"]


def test_no_python_warnings_reach_users_from_src():
    """User-facing warnings go through errors.warn (one line on stderr), never `warnings.warn`,
    which prints the source file and line of the call."""
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "src").rglob("*.py")
                 if "warnings.warn(" in p.read_text(encoding="utf-8")]
    assert offenders == []


def test_reading_table_files_writes_no_progress_redraws_into_a_pipe(tmp_path):
    """`datasets` draws tqdm bars of its own ("Generating train split"); off a terminal they
    are junk in the log, so they are off while we read; a value that is not text is named."""
    pytest.importorskip("datasets")
    good, listed = tmp_path / "rows.csv", tmp_path / "rows.parquet"
    good.write_text("text,id\nfirst row,1\n,2\nthird row,3\n")  # an empty cell is missing text, not an error
    code = f"""
import pyarrow as pa, pyarrow.parquet as pq
from simplified_slm.data import read_documents
print([d.text for d in read_documents({str(good)!r})])
pq.write_table(pa.table({{"text": [["a list"], ["fine"]]}}), {str(listed)!r})
list(read_documents({str(listed)!r}))
"""
    result = python(code)
    assert result.stdout.strip() == "['first row', 'third row']", result.stderr
    assert "\r" not in result.stderr and "Generating" not in result.stderr, result.stderr
    assert "rows.parquet: row 0 'text' is list, not text" in result.stderr.strip().splitlines()[-1]


def test_tokenizer_texts_follow_the_data_config(tmp_path, capsys):
    """What a tokenizer learns from is read like the token files: text_field, on_error."""
    from simplified_slm.data import DataConfig, tokenizer_texts

    path = tmp_path / "data.jsonl"
    path.write_text('{"body": "hello there"}\nnot json\n{"body": "more text"}\n')
    cfg = DataConfig.from_dict({"dataset": str(path), "text_field": "body", "on_error": "skip"})
    assert list(tokenizer_texts(cfg)()) == ["hello there", "more text"]
    assert capsys.readouterr().err == f"warning: skipped 1 of 3 lines in {path} (not JSON)\n"
