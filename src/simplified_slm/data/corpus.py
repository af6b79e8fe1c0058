"""Turn a data source named by the user into a stream of text documents.

Users point the project at very different things: a built-in corpus name, one text file,
a folder of notes, a JSONL dump, a local Hugging Face file. Everything downstream
(splitting, tokenizing) only wants `Document`s, so all format knowledge lives here, and
so does every "this file is not what you think it is" error: a bad file must be named
with the fix in one line, not surface later as a tokenizer crash.
"""

from __future__ import annotations

import gzip
import json
import zlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

from simplified_slm.errors import SLMError

CORPORA_DIR = Path(__file__).resolve().parent.parent / "corpora"
DEFAULT_EXTENSIONS: tuple[str, ...] = (".txt", ".md")
OnError = Literal["raise", "skip"]

_RECORD_FORMATS = (".jsonl", ".json")
_HF_FORMATS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


@dataclass(frozen=True)
class Document:
    """One unit of text; documents are never concatenated without an EOS between them."""

    name: str
    text: str


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


class SkippedFileWarning(UserWarning):
    """A file was left out because of `on_error="skip"`; the message names it and why."""


def builtin_dataset(name: str) -> BuiltinDataset | None:
    """The built-in corpus called `name`, or None when `name` is not a built-in."""
    return BUILTIN_DATASETS.get(name)


def read_documents(
    source: str | Path,
    *,
    text_field: str = "text",
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    on_error: OnError = "raise",
) -> Iterator[Document]:
    """Yield the documents of a built-in name, file or folder, in a deterministic order.

    A built-in name (a str) yields its training file; its validation file, if any, is
    `builtin_dataset(name).valid`. Built-in names win over same-named local paths, so
    write `./tinystories` to read a local folder of that name. A folder is searched
    recursively for files whose name ends with one of `extensions`, in sorted path order
    so the same folder always gives the same token stream. With `on_error="skip"` an
    unreadable file is left out with a `SkippedFileWarning` instead of stopping a long
    run over one bad file. Raises SLMError naming the source when nothing readable is found.
    """
    if on_error not in ("raise", "skip"):
        raise SLMError(f"on_error: {on_error!r} is not allowed; choose 'raise' or 'skip'")
    builtin = builtin_dataset(source) if isinstance(source, str) else None
    path = builtin.train if builtin else Path(source)
    if builtin is None and not path.exists():
        names = ", ".join(BUILTIN_DATASETS)
        raise SLMError(f"data source not found: {source}; pass a built-in dataset name "
                       f"({names}) or an existing file or folder")
    files = _list_files(path, extensions) if path.is_dir() else [path]
    found = False
    for file in files:
        try:
            documents = _read_file(file, text_field)
        except SLMError as err:
            if on_error == "raise":
                raise
            warnings.warn(f"skipped {err}", SkippedFileWarning, stacklevel=2)
            continue
        for document in documents:
            if document.text:
                found = True
                yield document
    if not found:
        raise SLMError(f"no text found in {source}: it is empty or every file was skipped; "
                       "point the data config at a source that holds text")


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
    if fmt in _HF_FORMATS:
        return _read_hf_file(path, _HF_FORMATS[fmt], text_field)
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
    """Local parquet/csv/arrow files through Hugging Face `datasets`, kept optional because
    it is a heavy dependency most users of the text formats never need."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"  # local files only: never touch the network
    try:
        import datasets
    except ImportError:
        raise SLMError(f"{path}: reading {fmt} files needs Hugging Face datasets; "
                       "pip install datasets (or convert the file to .jsonl or .txt)") from None
    try:
        if fmt == "arrow":
            table = datasets.Dataset.from_file(str(path))
        else:
            table = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as err:  # datasets/pyarrow raise many unrelated types for bad files
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SLMError(f"{path}: cannot load it as {fmt} ({first}); check the file") from None
    if text_field not in table.column_names:
        found = ", ".join(table.column_names)
        raise SLMError(f"{path}: no '{text_field}' column (found: {found}); "
                       "set the data config's text_field to the text column")
    documents = []
    for i, text in enumerate(table[text_field]):
        if text is None:
            continue  # missing values are common in tabular data; they hold no text
        if not isinstance(text, str):
            raise SLMError(f"{path}: row {i} '{text_field}' is {type(text).__name__}, not text; "
                           "set text_field to a string column")
        documents.append(Document(f"{path}[{i}]", text))
    return documents
