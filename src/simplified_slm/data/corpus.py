"""Turn a data source named by the user into a stream of text documents.

Users point the project at very different things: a built-in corpus name, a named dataset
whose files they put on disk (WikiText), one text file, a folder of notes, a JSONL dump, a
local Hugging Face file or `save_to_disk` folder. Everything downstream (splitting,
tokenizing) only wants `Document`s, so all format knowledge lives here (Hugging Face
formats in `hf_local`, WikiText's layouts in `wikitext`), and so does every "this file is
not what you think it is" error: a bad file must be named with the fix in one line, not
surface later as a tokenizer crash.
"""

from __future__ import annotations

import gzip
import json
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

from simplified_slm.data.document import Document
from simplified_slm.data.hf_local import (
    HF_FILE_FORMATS,
    is_saved_dataset,
    load_files,
    load_saved,
    saved_splits,
    text_documents,
)
from simplified_slm.data.wikitext import WIKITEXT
from simplified_slm.errors import SLMError

CORPORA_DIR = Path(__file__).resolve().parent.parent / "corpora"
DEFAULT_EXTENSIONS: tuple[str, ...] = (".txt", ".md")
OnError = Literal["raise", "skip"]

_RECORD_FORMATS = (".jsonl", ".json")


@dataclass(frozen=True)
class BuiltinDataset:
    """A corpus shipped inside the package (see corpora/README.md for licenses)."""

    name: str
    train: Path
    valid: Path | None


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    "tinyshakespeare": BuiltinDataset(
        "tinyshakespeare", CORPORA_DIR / "tinyshakespeare.txt.gz", None),
    "tinystories": BuiltinDataset(
        "tinystories", CORPORA_DIR / "tinystories_train.txt.gz",
        CORPORA_DIR / "tinystories_valid.txt.gz"),
}


DATASET_NAMES: tuple[str, ...] = (*BUILTIN_DATASETS, *WIKITEXT)  # names that are not paths


class SkippedFileWarning(UserWarning):
    """A file was left out because of `on_error="skip"`; the message names it and why."""


def builtin_dataset(name: str) -> BuiltinDataset | None:
    """The built-in corpus called `name`, or None when `name` is not a built-in."""
    return BUILTIN_DATASETS.get(name)


def has_validation_split(source: str | Path) -> bool:
    """True when `source` brings its own validation split (read with split="validation"):
    a built-in corpus with a validation file, WikiText, or a saved DatasetDict that has one."""
    if isinstance(source, str) and source in WIKITEXT:
        return True
    builtin = builtin_dataset(source) if isinstance(source, str) else None
    if builtin is not None:
        return builtin.valid is not None
    path = Path(source)
    return path.is_dir() and "validation" in saved_splits(path)


def read_documents(
    source: str | Path,
    *,
    text_field: str = "text",
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    on_error: OnError = "raise",
    split: str = "train",
) -> Iterator[Document]:
    """Yield the documents of a dataset name, file or folder, in a deterministic order.

    A built-in name (a str) yields its training file, or with `split="validation"` its
    validation file; a WikiText name (`wikitext2`, `wikitext103`) reads that split from the
    user's local copy (`$SLM_DATA_DIR`, see `data/wikitext.py`). Dataset names win over
    same-named local paths, so write `./tinystories` to read a local folder of that name. A `save_to_disk` folder of
    Hugging Face `datasets` yields its rows (of `split`, for a DatasetDict); any other folder
    is searched recursively for files whose name ends with one of `extensions`, in sorted
    path order so the same folder always gives the same token stream. With
    `on_error="skip"` an unreadable file is left out with a `SkippedFileWarning` instead of
    stopping a long run over one bad file (a missing WikiText file or a bad `save_to_disk`
    folder always raises: it is the whole dataset, not one file). Raises SLMError naming the source when nothing
    readable is found, or when `split` is not train and the source has no such split.
    """
    if on_error not in ("raise", "skip"):
        raise SLMError(f"on_error: {on_error!r} is not allowed; choose 'raise' or 'skip'")
    files = _source_files(source, split, extensions)
    found = False
    for file in files:
        try:
            documents = _read_source(file, split, text_field)
        except SLMError as err:
            if on_error == "raise" or not (isinstance(file, Path) and file.is_file()):
                raise  # a dataset name or a saved dataset folder is the whole source
            warnings.warn(f"skipped {err}", SkippedFileWarning, stacklevel=2)
            continue
        for document in documents:
            if document.text:
                found = True
                yield document
    if not found:
        raise SLMError(f"no text found in {source}: it is empty or every file was skipped; "
                       "point the data config at a source that holds text")


def _source_files(source: str | Path, split: str, extensions: Sequence[str]) -> list[str | Path]:
    """What to read for `source`: a WikiText name, a saved dataset folder, or files."""
    if isinstance(source, str) and source in WIKITEXT:
        return [source]
    builtin = builtin_dataset(source) if isinstance(source, str) else None
    if builtin is not None:
        if split == "train":
            return [builtin.train]
        if split == "validation" and builtin.valid is not None:
            return [builtin.valid]
        raise SLMError(f"{source} has no {split} split; hold out part of its text with data.val_fraction")
    path = Path(source)
    if not path.exists():
        raise SLMError(f"data source not found: {source}; pass a dataset name "
                       f"({', '.join(DATASET_NAMES)}) or an existing file or folder")
    if path.is_dir() and is_saved_dataset(path):
        return [path]
    if split != "train":
        raise SLMError(f"{source} has no {split} split; name a validation source in data.val_file")
    return [*_list_files(path, extensions)] if path.is_dir() else [path]


def _read_source(item: str | Path, split: str, text_field: str) -> list[Document]:
    if isinstance(item, str) and item in WIKITEXT:
        return WIKITEXT[item].documents(split)
    path = Path(item)
    if path.is_dir():
        return text_documents(load_saved(path, split), str(path), text_field)
    return _read_file(path, text_field)


def _list_files(folder: Path, extensions: Sequence[str]) -> list[Path]:
    """Matching files under `folder`, sorted by relative path; hidden paths are ignored
    because they are editor/VCS droppings (.git, .ipynb_checkpoints), not corpus text."""
    suffixes = tuple(e.lower() for e in extensions)
    files = [
        p for p in folder.rglob("*")
        if p.is_file() and p.name.lower().endswith(suffixes)
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    if not files:
        raise SLMError(f"no files ending in {', '.join(suffixes)} under {folder}; "
                       "add text files there or set the data config's extensions")
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _format_of(path: Path) -> str:
    """The format suffix, looking through one `.gz` layer (`a.jsonl.gz` -> `.jsonl`)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _read_file(path: Path, text_field: str) -> list[Document]:
    """All documents of one file, fully parsed, so a bad record fails the file as a whole
    (skip mode must not have yielded half of a broken file)."""
    fmt = _format_of(path)
    if fmt in HF_FILE_FORMATS:
        return _read_hf_file(path, HF_FILE_FORMATS[fmt], text_field)
    text = _decode(path)
    if fmt in _RECORD_FORMATS:
        return _parse_records(path, text, text_field)
    return [Document(str(path), text)]


def _decode(path: Path) -> str:
    """UTF-8 text of a (possibly gzipped) file; NUL bytes mean a binary file was picked up,
    which would otherwise silently poison the vocabulary."""
    try:
        raw = path.read_bytes()
        if path.suffix.lower() == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise SLMError(f"{path}: cannot read it ({err}); check the file or remove it") from None
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise SLMError(f"{path}: looks binary (NUL byte at offset {nul}); "
                       "remove it from the data or set on_error='skip'")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SLMError(f"{path}: not valid UTF-8 (byte offset {err.start}); "
                       "re-save it as UTF-8 or set on_error='skip'") from None


def _parse_records(path: Path, text: str, text_field: str) -> list[Document]:
    """`.json` holds one array of records (or one record); `.jsonl`, and `.json` files that
    are really JSON lines as HF exports them, hold one record per line."""
    if _format_of(path) == ".json":
        try:
            data = json.loads(text)
        except RecursionError:
            raise SLMError(f"{path}: JSON nested too deeply to read; flatten it to records") from None
        except json.JSONDecodeError:
            pass  # not one JSON value: read it as JSON lines below
        else:
            records = data if isinstance(data, list) else [data]
            return [_record_text(path, i, r, text_field) for i, r in enumerate(records)]
    documents = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except RecursionError:
            raise SLMError(f"{path}:{lineno}: JSON nested too deeply to read") from None
        except json.JSONDecodeError as err:
            raise SLMError(f"{path}:{lineno}: invalid JSON ({err.msg}); each line must be "
                           f'one object like {{"{text_field}": "..."}}') from None
        documents.append(_record_text(path, lineno, record, text_field, what="line"))
    return documents


def _record_text(path: Path, index: int, record: Any, text_field: str,
                 what: str = "record") -> Document:
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise SLMError(f"{path}: {what} {index} has no string '{text_field}' field "
                       f"(found: {keys}); set the data config's text_field to the text key")
    return Document(f"{path}:{index}", record[text_field])


def _read_hf_file(path: Path, fmt: str, text_field: str) -> list[Document]:
    """Local parquet/csv/arrow files through Hugging Face `datasets`, offline."""
    return text_documents(load_files([path], fmt, str(path)), str(path), text_field)
