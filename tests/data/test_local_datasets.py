"""Named datasets from the user's local files (WikiText) and generic local HF `datasets`
sources (parquet, arrow, save_to_disk folders), all read offline: a test that let any
socket connect would fail here."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import datasets
from conftest import tiny_experiment
from simplified_slm.cli.main import main
from simplified_slm.data import DataConfig, has_validation_split, prepare_dataset, read_documents
from simplified_slm.data import validation_documents
from simplified_slm.errors import SLMError
from simplified_slm.tokenizers import ByteTokenizer

SPLIT_ARTICLES = {"train": 6, "validation": 2, "test": 2}
RAW_NAMES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Any connection attempt fails the test; `datasets` caches into the test's folder."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    # as if the user had never asked for offline mode, with datasets already imported
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)


def stories(count: int, start: int = 0) -> list[str]:
    """Real text: TinyStories validation stories from the bundled corpus."""
    text = "".join(d.text for d in read_documents("tinystories", split="validation"))
    found = [s.strip() for s in text.split("\n\n") if len(s.strip()) > 200]
    return found[start:start + count]


def wikitext_lines(split: str) -> list[str]:
    """WikiText's raw format: ` = Title = ` articles with ` = = Section = = ` headings,
    every line starting with a space, blank lines ` ` between blocks."""
    order = list(SPLIT_ARTICLES)  # each split gets its own stories
    offset = sum(SPLIT_ARTICLES[s] for s in order[:order.index(split)])
    lines = [" \n"]
    for i, story in enumerate(stories(SPLIT_ARTICLES[split], offset)):
        sentences = story.replace("\n", " ").split(". ")
        half = len(sentences) // 2
        lines += [f" = Story {offset + i} = \n", " \n", f" {'. '.join(sentences[:half])} \n", " \n",
                  " = = Ending = = \n", " \n", f" {'. '.join(sentences[half:])} \n", " \n"]
    return lines


def write_raw(root: Path, folder: str = "wikitext-2-raw") -> Path:
    directory = root / folder
    directory.mkdir(parents=True)
    for split, name in RAW_NAMES.items():
        (directory / name).write_text("".join(wikitext_lines(split)), encoding="utf-8")
    return directory


def write_parquet(root: Path, folder: str = "wikitext-2-raw-v1", train_shards: int = 1) -> Path:
    """The Hugging Face layout: one row per line, blank lines stored as ""."""
    directory = root / folder
    directory.mkdir(parents=True)
    for split in SPLIT_ARTICLES:
        rows = ["" if not line.strip() else line for line in wikitext_lines(split)]
        shards = train_shards if split == "train" else 1
        size = -(-len(rows) // shards)
        for k in range(shards):
            table = pa.table({"text": rows[k * size:(k + 1) * size]})
            pq.write_table(table, directory / f"{split}-{k:05d}-of-{shards:05d}.parquet")
    return directory


def test_raw_and_parquet_layouts_give_the_same_articles(tmp_path, monkeypatch):
    monkeypatch.setenv("SLM_DATA_DIR", str(tmp_path / "raw_root"))
    write_raw(tmp_path / "raw_root")
    raw = {s: list(read_documents("wikitext2", split=s)) for s in SPLIT_ARTICLES}
    monkeypatch.setenv("SLM_DATA_DIR", str(tmp_path / "hf_root"))
    write_parquet(tmp_path / "hf_root" / "wikitext")  # as a clone of the HF repository leaves it
    parquet = {s: list(read_documents("wikitext2", split=s)) for s in SPLIT_ARTICLES}
    for split, count in SPLIT_ARTICLES.items():
        assert [d.text for d in raw[split]] == [d.text for d in parquet[split]]
        assert len(raw[split]) == count
        first = raw[split][0].text
        assert first.startswith(" = Story ") and " = = Ending = = \n" in first and "\n \n" not in first
    assert stories(1)[0].replace("\n", " ")[:60] in raw["train"][0].text
    assert has_validation_split("wikitext2")
    assert not datasets.config.HF_HUB_OFFLINE  # the offline switch was only on while reading


def test_offline_mode_is_on_while_datasets_reads(tmp_path, monkeypatch):
    """`datasets` was imported before and reads HF_DATASETS_OFFLINE only at import: the
    switch must be flipped on its live config, not just in the environment."""
    monkeypatch.setenv("SLM_DATA_DIR", str(tmp_path))
    write_parquet(tmp_path)
    seen = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        seen.append(datasets.config.HF_HUB_OFFLINE)
        return real(*args, **kwargs)
    monkeypatch.setattr(datasets, "load_dataset", spy)
    assert len(list(read_documents("wikitext2"))) == SPLIT_ARTICLES["train"]
    assert seen == [True]
    assert not datasets.config.HF_HUB_OFFLINE


def test_prepare_uses_the_validation_split_and_multi_shard_train(tmp_path, monkeypatch):
    monkeypatch.setenv("SLM_DATA_DIR", str(tmp_path / "data"))
    write_parquet(tmp_path / "data", "wikitext-103-raw-v1", train_shards=2)
    data = prepare_dataset(DataConfig(dataset="wikitext103"), ByteTokenizer(), tmp_path / "prepared")
    meta = data.meta
    assert meta["val_from"] == "wikitext103 (validation split)"
    assert meta["splits"]["train"]["documents"] == SPLIT_ARTICLES["train"]
    assert meta["splits"]["val"]["documents"] == SPLIT_ARTICLES["validation"]
    val_docs, _ = validation_documents(DataConfig(dataset="wikitext103"))
    val_text = "".join(d.text for d in val_docs)
    assert ByteTokenizer().decode(data.val[:200]) == val_text[:200]
    assert meta["splits"]["val"]["bytes"] == len(val_text.encode("utf-8"))


@pytest.mark.parametrize("present,missing", [(None, "train"), ("train", "validation")])
def test_missing_files_say_which_files_go_where(tmp_path, monkeypatch, present, missing):
    monkeypatch.setenv("SLM_DATA_DIR", str(tmp_path))
    if present:
        folder = tmp_path / "wikitext-2-raw"
        folder.mkdir()
        (folder / "wiki.train.raw").write_text("".join(wikitext_lines("train")))
    with pytest.raises(SLMError) as err:
        prepare_dataset(DataConfig(dataset="wikitext2"), ByteTokenizer(), tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message
    assert f"its {missing} split is not on disk" in message
    for expected in ("wiki.train.raw, wiki.valid.raw, wiki.test.raw", f"{tmp_path / 'wikitext-2-raw'}/",
                     "validation-00000-of-00001.parquet", f"{tmp_path / 'wikitext-2-raw-v1'}/",
                     "SLM_DATA_DIR", "nothing is downloaded"):
        assert expected in message, expected
    with pytest.raises(SLMError) as skipped:  # not a bad file to skip: the dataset is missing
        list(read_documents("wikitext2", on_error="skip", split=missing))
    assert str(skipped.value) == message


def test_default_folder_is_under_the_home_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("SLM_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(SLMError, match=str(tmp_path / ".cache" / "simplified_slm" / "data" / "wikitext-103-raw")):
        list(read_documents("wikitext103"))


def test_cli_trains_on_wikitext2_from_raw_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLM_DATA_DIR", str(tmp_path / "data"))
    write_raw(tmp_path / "data")
    cfg = tiny_experiment(tmp_path / "run", max_steps=6, eval_every=6, sample_every=6, log_every=3,
                          checkpoint_every=6)
    cfg["data"] = {"dataset": "wikitext2"}
    cfg["tokenizer"] = {"kind": "byte"}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert main(["train", "--config", str(tmp_path / "cfg.json")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 6 and result["val_loss"] > 0
    meta = json.loads((tmp_path / "run" / "data" / "meta.json").read_text())
    assert meta["val_from"] == "wikitext2 (validation split)"
    assert meta["splits"]["train"]["documents"] == SPLIT_ARTICLES["train"]


# --- generic local HF datasets sources (csv is in test_data.py) -------------------------

ROWS = {"text": ["first story here", None, "second story", "third one"], "label": [1, 0, 1, 0]}
EXPECTED = ["first story here", "second story", "third one"]


def test_parquet_file(tmp_path):
    pq.write_table(pa.table(ROWS), tmp_path / "rows.parquet")
    assert [d.text for d in read_documents(tmp_path / "rows.parquet")] == EXPECTED


def test_arrow_file_and_save_to_disk_folder(tmp_path):
    datasets.Dataset.from_dict(ROWS).save_to_disk(str(tmp_path / "saved"))
    assert [d.text for d in read_documents(tmp_path / "saved")] == EXPECTED
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    assert [d.text for d in read_documents(arrow)] == EXPECTED
    assert not has_validation_split(tmp_path / "saved")
    with pytest.raises(SLMError, match="no 'body' column .*found: text, label"):
        list(read_documents(tmp_path / "saved", text_field="body"))


def test_saved_dataset_dict_brings_its_validation_split(tmp_path):
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": stories(4)}),
                                   "validation": datasets.Dataset.from_dict({"text": stories(2, 4)})})
    splits.save_to_disk(str(tmp_path / "dict"))
    assert has_validation_split(tmp_path / "dict")
    data = prepare_dataset(DataConfig(dataset=str(tmp_path / "dict")), ByteTokenizer(), tmp_path / "out")
    assert data.meta["splits"]["train"]["documents"] == 4 and data.meta["splits"]["val"]["documents"] == 2
    assert data.meta["val_from"] == f"{tmp_path / 'dict'} (validation split)"
    only_train = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": stories(4)})})
    only_train.save_to_disk(str(tmp_path / "train_only"))
    with pytest.raises(SLMError, match="has no 'validation' split .*found: train"):
        list(read_documents(tmp_path / "train_only", split="validation"))
