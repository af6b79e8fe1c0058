"""WikiText-2 and WikiText-103 (raw) from files the user has put on disk; never downloaded.

The project never touches the network at run time, so `wikitext2` / `wikitext103` name
local copies in one of the two layouts people actually have, under the data folder
(`$SLM_DATA_DIR`, default `~/.cache/simplified_slm/data`, optionally inside a `wikitext/`
subfolder as a clone of the Hugging Face dataset repository leaves them):

- the original archives unpacked: `wikitext-2-raw/wiki.{train,valid,test}.raw`;
- the Hugging Face parquet files: `wikitext-2-raw-v1/{train,validation,test}-*.parquet`.

Both are read through `datasets` (offline) and give the same documents: one per article,
split at the top-level ` = Title = ` headings (so EOS separates articles and per-document
metrics are per article), blank lines left out. The dataset's own validation split is the validation data.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from simplified_slm.data.document import Document
from simplified_slm.data.hf_local import load_files
from simplified_slm.errors import SLMError

DATA_DIR_ENV = "SLM_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/simplified_slm/data"
SPLITS = ("train", "validation", "test")
_RAW_NAMES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}
_ARTICLE_TITLE = re.compile(r"^ = [^=].* = \s*$")  # " = Title = " but not " = = Section = = "


@dataclass(frozen=True)
class WikiText:
    """One WikiText size: its dataset name and the folder names of its two layouts."""

    name: str
    raw_folder: str  # the unpacked wikitext-*-raw-v1.zip
    parquet_folder: str  # the Hugging Face config folder
    parquet_files: tuple[str, ...]  # its file names, for the error message

    def files(self, split: str) -> tuple[str, list[Path]]:
        """(builder format, files) of `split`, from the first layout that has it."""
        if split not in SPLITS:
            raise SLMError(f"{self.name} has no '{split}' split; use one of {', '.join(SPLITS)}")
        for root in _roots():
            raw = root / self.raw_folder / _RAW_NAMES[split]
            if raw.is_file():
                return "text", [raw]
            shards = sorted((root / self.parquet_folder).glob(f"{split}-*.parquet"))
            if shards:
                return "parquet", shards
        raise SLMError(self._missing(split))

    def _missing(self, split: str) -> str:
        root = data_dir()
        return (f"{self.name}: its {split} split is not on disk, and nothing is downloaded; put "
                f"{', '.join(_RAW_NAMES.values())} (from {self.raw_folder}-v1.zip) in "
                f"{root / self.raw_folder}/, or the Hugging Face parquet files "
                f"{', '.join(self.parquet_files)} in {root / self.parquet_folder}/ "
                f"(set {DATA_DIR_ENV} to use another folder than {root})")

    def documents(self, split: str) -> list[Document]:
        """The articles of `split`, in file order."""
        fmt, paths = self.files(split)
        where = str(paths[0]) if len(paths) == 1 else f"{paths[0].parent}/{split}-*.parquet"
        options = {"keep_linebreaks": True} if fmt == "text" else {}
        table = load_files(paths, fmt, where, **options)
        if "text" not in table.column_names:
            raise SLMError(f"{where}: no 'text' column (found: {', '.join(table.column_names)}); "
                           "these are not WikiText files")
        return _articles(table["text"], f"{self.name}/{split}")


WIKITEXT: dict[str, WikiText] = {
    "wikitext2": WikiText("wikitext2", "wikitext-2-raw", "wikitext-2-raw-v1", (
        "train-00000-of-00001.parquet", "validation-00000-of-00001.parquet", "test-00000-of-00001.parquet")),
    "wikitext103": WikiText("wikitext103", "wikitext-103-raw", "wikitext-103-raw-v1", (
        "train-00000-of-00002.parquet", "train-00001-of-00002.parquet", "validation-00000-of-00001.parquet",
        "test-00000-of-00001.parquet")),
}


def data_dir() -> Path:
    """Where local copies of named datasets live (`$SLM_DATA_DIR`, read on every call)."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()


def _roots() -> list[Path]:
    root = data_dir()
    return [root, root / "wikitext"]  # the latter: a clone of the HF `wikitext` repository


def _articles(lines: list[str | None], prefix: str) -> list[Document]:
    """Group lines (a raw file's, or the parquet rows, which are lines) into articles.

    Blank lines are dropped: the parquet files store them as "", so keeping the raw files'
    " \\n" would make the two layouts give different text."""
    articles: list[list[str]] = []
    for line in lines:
        if not line or not line.strip():
            continue
        if _ARTICLE_TITLE.match(line) or not articles:
            articles.append([])
        articles[-1].append(line)
    documents = [Document(f"{prefix}[{i}]", "".join(parts)) for i, parts in enumerate(articles)]
    return [d for d in documents if d.text.strip()]
