"""Data layer: corpus reading, prepared token files, batch sampling."""

from __future__ import annotations

import gzip
import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from simplified_slm.data import (
    BatchSampler,
    DataConfig,
    Document,
    builtin_dataset,
    iter_eval_batches,
    load_prepared,
    prepare_dataset,
    read_documents,
    split_documents,
    token_dtype,
)
from simplified_slm.errors import SLMError
from simplified_slm.tokenizers import ByteTokenizer, CharTokenizer


def corpus_text(name: str, part: str = "train") -> str:
    builtin = builtin_dataset(name)
    path = builtin.train if part == "train" else builtin.valid
    return gzip.decompress(path.read_bytes()).decode("utf-8")


class EosByteTokenizer(ByteTokenizer):
    """Byte ids plus id 256 as end-of-document, to exercise EOS insertion."""

    eos_token_id = 256

    @property
    def vocab_size(self) -> int:
        return 257


class CountingByteTokenizer(ByteTokenizer):
    """Counts the characters it encodes, to tell re-tokenizing from reuse."""

    def __init__(self) -> None:
        self.chars = 0

    def encode_ids(self, text):
        self.chars += len(text)
        return super().encode_ids(text)


class FailingByteTokenizer(ByteTokenizer):
    """Fails on text holding a marker, to interrupt prepare half way."""

    def encode_ids(self, text):
        if "BOOM" in text:
            raise RuntimeError("tokenizer crashed")
        return super().encode_ids(text)


def write_files(root: Path, files: dict[str, str | bytes]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return root


# --- bundled corpora -------------------------------------------------------------------


def test_tinyshakespeare_byte_split_is_95_5_at_a_newline(tmp_path):
    text = corpus_text("tinyshakespeare")
    data = prepare_dataset(DataConfig(), ByteTokenizer(), tmp_path)
    train, val = bytes(data.train), bytes(data.val)
    assert train + val == text.encode("utf-8")  # nothing lost, nothing duplicated
    assert len(val) / (len(train) + len(val)) == pytest.approx(0.05, abs=0.001)
    assert train.endswith(b"\n")
    splits = data.meta["splits"]
    assert splits["train"] == {"tokens": len(train), "bytes": len(train), "documents": 1}
    assert splits["val"]["bytes"] == len(val)
    assert data.meta["dtype"] == "uint8" and data.train.dtype == np.uint8
    assert data.meta["tokenizer"] == ByteTokenizer().spec()


def test_tinyshakespeare_char_meta_bytes_match_split_text(tmp_path):
    text = corpus_text("tinyshakespeare")
    tokenizer = CharTokenizer.from_corpus([text])
    data = prepare_dataset(DataConfig(), tokenizer, tmp_path)
    train_text, val_text = tokenizer.decode(data.train), tokenizer.decode(data.val)
    assert train_text + val_text == text
    assert data.meta["splits"]["train"]["bytes"] == len(train_text.encode("utf-8"))
    assert data.meta["splits"]["val"]["bytes"] == len(val_text.encode("utf-8"))
    assert len(data.val) / len(text) == pytest.approx(0.05, abs=0.001)


def test_tinystories_uses_its_own_valid_file(tmp_path):
    cfg = DataConfig(dataset="tinystories", max_train_bytes=50_000)
    data = prepare_dataset(cfg, ByteTokenizer(), tmp_path)
    valid = corpus_text("tinystories", "valid").encode("utf-8")
    assert bytes(data.val) == valid
    assert data.meta["splits"]["val"]["bytes"] == len(valid)
    assert bytes(data.train) == corpus_text("tinystories").encode("utf-8")[:50_000]
    assert data.meta["splits"]["train"]["bytes"] == 50_000


# --- reading sources -------------------------------------------------------------------


def test_directory_is_read_recursively_in_sorted_order(tmp_path):
    root = write_files(tmp_path / "notes", {
        "b.txt": "bee", "a/z.md": "zed", "a/y.txt": "why", "skip.json": "{}",
        ".git/hidden.txt": "hidden", "c.txt.gz": b"",
    })
    (root / "c.txt.gz").write_bytes(gzip.compress(b"sea"))
    docs = list(read_documents(root, extensions=[".txt", ".md", ".txt.gz"]))
    assert [d.text for d in docs] == ["why", "zed", "bee", "sea"]
    assert [d.text for d in read_documents(root)] == ["why", "zed", "bee"]


def test_invalid_utf8_raises_naming_the_file_or_is_skipped_with_warning(tmp_path, capsys):
    root = write_files(tmp_path, {"good.txt": "fine text", "sub/bad.txt": b"caf\xe9 latin-1",
                                  "blob.txt": b"\x89PNG\x00\x00"})
    with pytest.raises(SLMError, match=r"bad\.txt: not valid UTF-8 .*on_error='skip'"):
        list(read_documents(root / "sub"))
    with pytest.raises(SLMError, match=r"blob\.txt: looks binary"):
        list(read_documents(root))
    capsys.readouterr()
    docs = list(read_documents(root, on_error="skip"))
    # the binary file is left out whole; the bad byte only, the rest of its file is kept
    assert [d.text for d in docs] == ["fine text", "caf latin-1"]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith("warning: skipped ") for line in lines), lines
    assert "blob.txt: looks binary" in lines[0]
    assert lines[1] == f"warning: skipped 1 of 12 bytes in {root / 'sub' / 'bad.txt'} (not UTF-8)"


def test_jsonl_records_and_missing_field_names_the_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n', encoding="utf-8")
    assert [d.text for d in read_documents(good)] == ["one", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"text": "two"}\n{"body": "three"}\n', encoding="utf-8")
    with pytest.raises(SLMError, match=r"bad\.jsonl: line 3 has no 'text' field "
                                       r"\(found: body\); .*text_field"):
        list(read_documents(bad))
    odd_keys = tmp_path / "odd.jsonl"
    odd_keys.write_text('{"\\n": 1, "body": 2}\n', encoding="utf-8")  # a key that is a newline
    with pytest.raises(SLMError, match=r"\(found: \\n, body\)") as raised:
        list(read_documents(odd_keys))
    assert "\n" not in str(raised.value)  # still one line
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "one"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(SLMError, match=r"broken\.jsonl:2: invalid JSON"):
        list(read_documents(broken))


def test_json_array_and_custom_field(tmp_path):
    path = tmp_path / "records.json"
    path.write_text(json.dumps([{"body": "alpha"}, {"body": "beta"}]), encoding="utf-8")
    assert [d.text for d in read_documents(path, text_field="body")] == ["alpha", "beta"]
    cfg = DataConfig.from_dict({"train_file": str(path), "text_field": "body",
                                "val_fraction": 0.5})
    data = prepare_dataset(cfg, ByteTokenizer(), tmp_path / "out")
    assert (bytes(data.train), bytes(data.val)) == (b"alpha", b"beta")


def test_empty_and_missing_sources_raise_naming_them(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SLMError, match=r"no text found in .*empty\.txt"):
        list(read_documents(empty))
    with pytest.raises(SLMError, match=r"data source not found: .*nope\.txt; .*tinyshakespeare"):
        list(read_documents(tmp_path / "nope.txt"))
    with pytest.raises(SLMError, match=r"no files ending in \.txt, \.md under"):
        list(read_documents(write_files(tmp_path / "d", {"a.csv": "x"})))


def test_hf_formats_need_datasets(tmp_path):
    path = write_files(tmp_path, {"rows.csv": "text,label\nhello there,1\nsecond row,0\n"})
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(SLMError, match=r"rows\.csv: .*pip install datasets"):
            list(read_documents(path / "rows.csv"))
    else:
        assert [d.text for d in read_documents(path / "rows.csv")] == ["hello there", "second row"]


# --- splitting and config --------------------------------------------------------------


def test_split_keeps_whole_documents_when_a_boundary_is_near():
    docs = [Document(f"d{i}", "x" * 10) for i in range(40)]
    train, val = split_documents(docs, 0.05)
    assert (len(train), len(val)) == (38, 2) and val == docs[38:]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="ab\n", min_size=1, max_size=60), min_size=1, max_size=8),
       st.floats(0.01, 0.5))
def test_split_is_a_lossless_cut(texts, fraction):
    docs = [Document(str(i), t) for i, t in enumerate(texts)]
    if sum(map(len, texts)) < 2:
        with pytest.raises(SLMError):
            split_documents(docs, fraction)
        return
    train, val = split_documents(docs, fraction)
    assert train and val and all(d.text for d in train[-1:] + val[:1])
    assert "".join(d.text for d in train + val) == "".join(texts)


def test_data_config_validation_names_the_field():
    with pytest.raises(SLMError, match=r"DataConfig\.train_file: both dataset"):
        DataConfig(train_file="x.txt")
    with pytest.raises(SLMError, match=r"DataConfig\.dataset: no data source"):
        DataConfig(dataset=None)
    for bad in (0.0, 0.6):
        with pytest.raises(SLMError, match=r"DataConfig\.val_fraction"):
            DataConfig(val_fraction=bad)
    with pytest.raises(SLMError, match=r"DataConfig\.val_file: val_file needs train_file"):
        DataConfig(val_file="v.txt")
    with pytest.raises(SLMError, match=r"DataConfig\.extensions: 'txt' must start with a dot"):
        DataConfig(extensions=["txt"])
    with pytest.raises(SLMError, match=r"unknown key 'val_fracton'; did you mean 'val_fraction'"):
        DataConfig.from_dict({"val_fracton": 0.1})
    cfg = DataConfig.from_dict({"train_file": "a.txt", "val_file": "b.txt"})
    assert cfg.dataset is None and DataConfig.from_dict(cfg.to_dict()) == cfg


def test_token_dtype_is_the_narrowest_fit(tmp_path):
    assert [token_dtype(v) for v in (256, 257, 65536, 65537)] == [
        np.uint8, np.uint16, np.uint16, np.uint32]
    chars = [chr(0x4E00 + i) for i in range(300)]
    tokenizer = CharTokenizer([*chars, "\n"], policy="corpus")
    write_files(tmp_path, {"han.txt": "".join(chars) + "\n" + "".join(reversed(chars))})
    cfg = DataConfig(dataset=str(tmp_path / "han.txt"), val_fraction=0.5)
    data = prepare_dataset(cfg, tokenizer, tmp_path / "out")
    assert data.train.dtype == np.uint16 and data.meta["dtype"] == "uint16"
    decoded = tokenizer.decode(data.train) + tokenizer.decode(data.val)
    assert decoded == (tmp_path / "han.txt").read_text(encoding="utf-8")


def test_eos_is_inserted_between_documents(tmp_path):
    root = write_files(tmp_path / "docs", {f"{i:02d}.txt": f"doc {i}\n" for i in range(20)})
    data = prepare_dataset(DataConfig(dataset=str(root)), EosByteTokenizer(), tmp_path / "a")
    assert data.meta["splits"]["val"]["documents"] == 1
    train = data.train.tolist()
    assert train.count(256) == 18 and train[-1] != 256
    assert data.meta["splits"]["train"]["bytes"] == len(train) - 18
    plain = prepare_dataset(DataConfig(dataset=str(root), append_eos=False), EosByteTokenizer(),
                            tmp_path / "b")
    assert 256 not in plain.train.tolist()


# --- prepared folders ------------------------------------------------------------------


def test_second_prepare_reuses_and_changes_rebuild(tmp_path):
    source = write_files(tmp_path, {"text.txt": "line one\nline two\n" * 500}) / "text.txt"
    cfg, out = DataConfig(dataset=str(source)), tmp_path / "out"
    tokenizer = CountingByteTokenizer()
    first = prepare_dataset(cfg, tokenizer, out)
    encoded, mtime = tokenizer.chars, (out / "train.bin").stat().st_mtime_ns
    second = prepare_dataset(cfg, tokenizer, out)
    assert second.reused and not first.reused
    assert tokenizer.chars - encoded <= 4096  # only the fingerprint probe, no re-tokenizing
    assert (out / "train.bin").stat().st_mtime_ns == mtime
    assert not prepare_dataset(cfg.replace(val_fraction=0.1), tokenizer, out).reused
    source.write_text("other text\n" * 500, encoding="utf-8")
    rebuilt = prepare_dataset(cfg.replace(val_fraction=0.1), tokenizer, out)
    assert not rebuilt.reused and bytes(rebuilt.train).startswith(b"other text")


def test_truncated_or_missing_files_are_detected(tmp_path):
    source = write_files(tmp_path, {"t.txt": "abc\n" * 1000}) / "t.txt"
    cfg, out = DataConfig(dataset=str(source)), tmp_path / "out"
    prepare_dataset(cfg, ByteTokenizer(), out)
    with open(out / "train.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(SLMError, match=r"train\.bin holds 100 bytes but meta\.json records 3800 "
                                       r"uint8 tokens .*prepare the data again"):
        load_prepared(out)
    assert not prepare_dataset(cfg, ByteTokenizer(), out).reused  # damaged folder is rebuilt
    assert len(load_prepared(out).train) == 3800
    (out / "meta.json").write_text("{not json")
    with pytest.raises(SLMError, match=r"meta\.json is corrupt"):
        load_prepared(out)
    with pytest.raises(SLMError, match=r"no prepared dataset in .*meta\.json missing"):
        load_prepared(tmp_path / "elsewhere")


def test_failed_prepare_leaves_nothing_half_written(tmp_path):
    root = write_files(tmp_path / "docs", {f"{i:02d}.txt": "fine\n" * 50 for i in range(19)})
    write_files(root, {"99.txt": "BOOM\n" * 50})  # lands in the val split
    out = tmp_path / "out"
    cfg = DataConfig(dataset=str(root), val_fraction=0.1)
    prepare_dataset(cfg, ByteTokenizer(), out)  # a valid old dataset, another config
    with pytest.raises(RuntimeError, match="tokenizer crashed"):
        prepare_dataset(cfg.replace(val_fraction=0.05), FailingByteTokenizer(), out)
    assert sorted(p.name for p in out.iterdir()) == ["train.bin", "val.bin"]  # no meta, no temps
    with pytest.raises(SLMError, match="no prepared dataset"):
        load_prepared(out)


# --- sampling --------------------------------------------------------------------------


def test_random_batches_are_a_pure_function_of_seed_and_step():
    tokens = np.arange(5000, dtype=np.uint16)
    sampler = BatchSampler(tokens, block_size=16, batch_size=8, seed=3)
    x, y = sampler.batch(7)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    fresh = BatchSampler(tokens, block_size=16, batch_size=8, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(fresh.batch(7), (x, y)))
    assert not torch.equal(sampler.batch(8)[0], x)
    assert not torch.equal(BatchSampler(tokens, 16, 8, seed=4).batch(7)[0], x)
    starts = torch.cat([sampler.batch(s)[0][:, 0] for s in range(200)])
    assert starts.min() >= 0 and starts.max() <= 5000 - 17


def test_sequential_mode_covers_windows_in_order_and_wraps():
    tokens = np.arange(101, dtype=np.uint8)  # 10 non-overlapping windows of 10 + 1 target
    sampler = BatchSampler(tokens, block_size=10, batch_size=4, seed=0, mode="sequential")
    starts = [int(s) for step in range(5) for s in sampler.batch(step)[0][:, 0]]
    assert starts == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 0, 10, 20, 30, 40, 50, 60, 70, 80, 90]
    strided = BatchSampler(tokens, block_size=10, batch_size=3, seed=0, mode="sequential",
                           stride=45)
    assert strided.batch(0)[0][:, 0].tolist() == [0, 45, 90]


def test_sampler_state_dict_refuses_changed_settings_or_data():
    tokens = np.arange(1000, dtype=np.uint16)
    state = BatchSampler(tokens, 32, 4, seed=1).state_dict()
    BatchSampler(tokens, 32, 4, seed=1).load_state_dict(state)
    with pytest.raises(SLMError, match=r"block_size was 32 and is now 64"):
        BatchSampler(tokens, 64, 4, seed=1).load_state_dict(state)
    changed = tokens.copy()
    changed[0] = 7
    with pytest.raises(SLMError, match=r"the data changed"):
        BatchSampler(changed, 32, 4, seed=1).load_state_dict(state)


def test_sampler_argument_errors_name_the_fix():
    with pytest.raises(SLMError, match=r"val split has 10 tokens.*smaller block_size"):
        BatchSampler(np.arange(10), 16, 2, seed=0, split="val")
    with pytest.raises(SLMError, match=r"stride only applies to mode='sequential'"):
        BatchSampler(np.arange(100), 8, 2, seed=0, stride=4)
    with pytest.raises(SLMError, match=r"mode 'shuffle' is unknown"):
        BatchSampler(np.arange(100), 8, 2, seed=0, mode="shuffle")


def test_eval_batches_cover_the_split_once_in_order():
    tokens = np.arange(1, 1004, dtype=np.uint16)  # 1003 tokens: 62 windows of 16, rest dropped
    batches = list(iter_eval_batches(tokens, block_size=16, batch_size=5))
    assert [len(x) for x, _ in batches] == [5] * 12 + [2]
    targets = torch.cat([y.reshape(-1) for _, y in batches])
    assert torch.equal(targets, torch.from_numpy(tokens[1:1 + 62 * 16].astype(np.int64)))
    assert all(torch.equal(y[:, :-1], x[:, 1:]) for x, y in batches)
    assert len(list(iter_eval_batches(tokens, 16, 5, max_batches=3))) == 3
    with pytest.raises(SLMError, match="the val split has 3 tokens"):
        iter_eval_batches(tokens[:3], 16, 5)


def test_prepared_splits_feed_the_samplers(tmp_path):
    data = prepare_dataset(DataConfig(), ByteTokenizer(), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read-only memmaps must not trigger torch warnings
        x, y = BatchSampler(data.train, 64, 4, seed=0).batch(0)
        vx, _ = next(iter_eval_batches(data.val, 64, 4))
    assert bytes(x[0].tolist()) in bytes(data.train)
    assert bytes(vx[0].tolist()) == bytes(data.val[:64])
