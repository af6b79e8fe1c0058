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
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from simplified_slm.data.document import Document
from simplified_slm.data.hf_local import (
    HF_FILE_FORMATS,
    is_saved_dataset,
    load_files,
    load_saved,
    saved_splits,
    text_documents,
)
from simplified_slm.data.skips import OnError, SkipTally
from simplified_slm.data.wikitext import WIKITEXT
from simplified_slm.errors import SLMError, warn

CORPORA_DIR = Path(__file__).resolve().parent.parent / "corpora"
DEFAULT_EXTENSIONS: tuple[str, ...] = (".txt", ".md")

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
    `on_error="skip"` a bad record (a JSONL line, a JSON record, a table row) or an
    undecodable byte span is left out, and so is a file that cannot be read at all (binary,
    corrupt), instead of stopping a long run; each such file gets one `warning:` line on
    stderr with the counts (a missing WikiText file or a bad `save_to_disk` folder always
    raises: it is the whole dataset, not one file). Raises SLMError naming the source when nothing
    readable is found, or when `split` is not train and the source has no such split.
    """
    if on_error not in ("raise", "skip"):
        raise SLMError(f"on_error: {on_error!r} is not allowed; choose 'raise' or 'skip'")
    files = _source_files(source, split, extensions)
    found = False
    for file in files:
        tally = SkipTally(on_error)
        try:
            documents = _read_source(file, split, text_field, tally)
        except SLMError as err:
            if on_error == "raise" or not (isinstance(file, Path) and file.is_file()):
                raise  # a dataset name or a saved dataset folder is the whole source
            warn(f"skipped {str(err).split('; ', 1)[0]}")  # the problem; its fix would say "skip"
            continue
        tally.report(file)
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


def _read_source(item: str | Path, split: str, text_field: str, tally: SkipTally) -> list[Document]:
    if isinstance(item, str) and item in WIKITEXT:
        return WIKITEXT[item].documents(split)
    path = Path(item)
    if path.is_dir():
        return text_documents(load_saved(path, split), str(path), text_field, tally)
    return _read_file(path, text_field, tally)


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


def _read_file(path: Path, text_field: str, tally: SkipTally) -> list[Document]:
    """All documents of one file, fully parsed before any is yielded, so a file that fails
    as a whole in skip mode has not contributed half of itself."""
    fmt = _format_of(path)
    if fmt in HF_FILE_FORMATS:
        return text_documents(load_files([path], HF_FILE_FORMATS[fmt], str(path)), str(path), text_field, tally)
    text = _decode(path, tally)
    if fmt in _RECORD_FORMATS:
        return _parse_records(path, text, text_field, tally)
    return [Document(str(path), text)]


def _decode(path: Path, tally: SkipTally) -> str:
    """UTF-8 text of a (possibly gzipped) file; NUL bytes mean a binary file was picked up,
    which would otherwise silently poison the vocabulary. An undecodable byte span is an
    error, or in skip mode is left out and the text around it kept."""
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
    tally.count("bytes", len(raw))
    pieces, start = [], 0
    while True:
        codec = "utf-8-sig" if start == 0 else "utf-8"
        try:  # each attempt stops at the next bad span, so the loop reads `raw` about once
            pieces.append(raw[start:].decode(codec))
            return "".join(pieces)
        except UnicodeDecodeError as err:
            tally.bad("bytes", "not UTF-8", SLMError(
                f"{path}: not valid UTF-8 (byte offset {start + err.start}); "
                "re-save it as UTF-8 or set on_error='skip'"), n=err.end - err.start)
            pieces.append(raw[start:start + err.start].decode(codec))
            start += err.end


def _parse_records(path: Path, text: str, text_field: str, tally: SkipTally) -> list[Document]:
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
            return _record_documents(path, enumerate(data if isinstance(data, list) else [data]),
                                     text_field, tally, "records")
    return _record_documents(path, _json_lines(path, text, text_field, tally), text_field, tally, "lines")


def _json_lines(path: Path, text: str, text_field: str, tally: SkipTally) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line that is JSON."""
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        tally.count("lines")
        try:
            value = json.loads(line)
        except RecursionError:
            tally.bad("lines", "nested too deeply", SLMError(f"{path}:{lineno}: JSON nested too deeply to read"))
            continue
        except json.JSONDecodeError as err:
            tally.bad("lines", "not JSON", SLMError(
                f"{path}:{lineno}: invalid JSON ({err.msg}); each line must be "
                f'one object like {{"{text_field}": "..."}}'))
            continue
        yield lineno, value


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
               int: "a number", float: "a number", type(None): "null"}


def _record_documents(path: Path, records: Iterable[tuple[int, Any]], text_field: str,
                      tally: SkipTally, unit: str) -> list[Document]:
    """The `text_field` string of each (index, record) as a document; a record without one
    raises an error that says what is there instead, or in skip mode is left out."""
    what = unit[:-1]  # "line 3", "record 3"
    documents = []
    for index, record in records:
        if unit != "lines":  # _json_lines counts its own, bad JSON included
            tally.count(unit)
        value = record.get(text_field) if isinstance(record, dict) else None
        if isinstance(value, str):
            documents.append(Document(f"{path}:{index}", value))
            continue
        if not isinstance(record, dict):
            reason = "not an object"
            problem = f"is {_JSON_TYPES.get(type(record), type(record).__name__)}, not an object"
        elif text_field not in record:
            reason = f"no '{text_field}' field"
            # keys as JSON spells them, unquoted: a key holding a newline must not break the line
            keys = ", ".join(json.dumps(key, ensure_ascii=False)[1:-1] for key in record)
            problem = f"has no '{text_field}' field (found: {keys or 'no keys'})"
        else:
            kind = _JSON_TYPES.get(type(value), type(value).__name__)
            reason = f"'{text_field}' is {kind}"
            problem = f"has a '{text_field}' field, but it is {kind} ({json.dumps(value)[:40]}), not a string"
        tally.bad(unit, reason, SLMError(
            f"{path}: {what} {index} {problem}; each {what} needs a string '{text_field}': fix it, "
            "set the data config's text_field to the key that holds the text, or set on_error='skip'"))
    return documents
