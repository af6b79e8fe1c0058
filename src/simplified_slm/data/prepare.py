"""Tokenize a corpus once into flat token files every training run can memory-map.

Training reads random windows millions of times, so the text is tokenized up front into
`train.bin` / `val.bin` (raw ids, the narrowest dtype the vocab fits) plus
`meta.json`. The meta records what produced the files (config, tokenizer, a fingerprint of
both and of the text) so a second run with the same inputs reuses them instantly, and the
UTF-8 byte count of each split so bits-per-byte can be computed for any tokenizer.

Files are written atomically and `meta.json` is removed first and written last: a folder
either holds a complete, consistent dataset or no `meta.json` at all.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np

from simplified_slm.configbase import ConfigBase
from simplified_slm.data.corpus import (
    DATASET_NAMES,
    DEFAULT_EXTENSIONS,
    Document,
    builtin_dataset,
    has_validation_split,
    read_documents,
)
from simplified_slm.errors import SLMError
from simplified_slm.tokenizers.base import Tokenizer
from simplified_slm.utils.io import atomic_write, atomic_write_json
from simplified_slm.utils.progress import progress

FORMAT = "simplified_slm.prepared/1"
META_FILE = "meta.json"
SPLITS = ("train", "val")
_CHUNK_CHARS = 1 << 20  # bounds the peak memory of one encode_ids call (ids as Python ints)
_PROBE_CHARS = 4096


@dataclasses.dataclass
class DataConfig(ConfigBase):
    """Where the text comes from and how it is split; see `prepare_dataset`."""

    dataset: str | None = "tinyshakespeare"  # dataset name (built-in or WikiText), file or folder
    train_file: str | None = None  # explicit training source (file or folder)
    val_file: str | None = None  # explicit validation source; else val_fraction is held out
    val_fraction: float = 0.05
    text_field: str = "text"  # key of the text in .jsonl/.json/parquet/csv records
    extensions: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_EXTENSIONS))
    max_train_bytes: int | None = None  # cap on training text for quick runs; val is not capped
    append_eos: bool = True  # separate documents with the tokenizer's eos id, if it has one
    on_error: Literal["raise", "skip"] = "raise"  # "skip": leave out bad records/bytes/files, one warning per file
    # "chat": train_file/val_file are JSONL conversations, trained with answer-only loss (data/chat.py)
    format: Literal["text", "chat"] = "text"
    chat_template: str | None = None  # format chat: null = the tokenizer's own, "plain" = the named default

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str | None = None) -> "DataConfig":
        """A config naming its own train_file means "not the default corpus"; making users
        also write `dataset: null` would turn the default into a trap."""
        if isinstance(data, dict) and data.get("train_file") is not None and "dataset" not in data:
            data = {**data, "dataset": None}
        return super().from_dict(data, where)

    def validate(self) -> None:
        for name in ("dataset", "train_file", "val_file"):
            if getattr(self, name) == "":
                self._fail(name, "is an empty string; use null to leave it unset")
        if self.format == "chat" and self.train_file is None:
            self._fail("train_file", "format chat reads conversations from a JSONL train_file; set it (and "
                       "optionally val_file)")
        if self.dataset is not None and self.train_file is not None:
            self._fail("train_file", f"both dataset ({self.dataset!r}) and train_file are set; "
                       "set dataset to null to train on train_file, or remove train_file")
        if self.dataset is None and self.train_file is None:
            self._fail("dataset", f"no data source; set dataset to a built-in name "
                       f"({', '.join(DATASET_NAMES)}) or a path, or set train_file")
        if self.val_file is not None and self.train_file is None:
            self._fail("val_file", "val_file needs train_file; set dataset to null and name "
                       "the training data in train_file")
        if not 0.0 < self.val_fraction <= 0.5:
            self._fail("val_fraction", f"{self.val_fraction} is outside (0, 0.5]; "
                       "use e.g. 0.05 to hold out the last 5% of the text")
        if not self.text_field:
            self._fail("text_field", "is empty; name the record key that holds the text")
        for ext in self.extensions:
            if not ext.startswith("."):
                self._fail("extensions", f"{ext!r} must start with a dot, e.g. '.txt'")
        if self.max_train_bytes is not None and self.max_train_bytes <= 0:
            self._fail("max_train_bytes", f"{self.max_train_bytes} must be positive, or null "
                       "for no cap")


@dataclasses.dataclass
class PreparedData:
    """Read-only memory maps of the token files plus their meta.json contents."""

    directory: Path
    train: np.ndarray
    val: np.ndarray
    meta: dict[str, Any]
    reused: bool = False  # True when prepare_dataset found the same dataset already there


def token_dtype(vocab_size: int) -> np.dtype:
    """Narrowest unsigned dtype holding every id: halves or quarters disk and page cache."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise SLMError(f"vocab_size {vocab_size} does not fit in uint32; use a smaller vocabulary")


def split_documents(documents: Sequence[Document],
                    val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Hold out the last `val_fraction` of the text (by characters) for validation.

    The tail rather than a random sample keeps validation text unseen in training even
    when neighbouring lines are near-duplicates. The cut moves to a document boundary when
    one is within 20% of the validation size (whole documents stay whole); otherwise the
    document holding the cut is split at the nearest newline, so a single-file corpus
    still gets a clean line boundary.
    """
    ends = list(itertools.accumulate(len(d.text) for d in documents))
    total = ends[-1] if ends else 0
    if total < 2:
        raise SLMError("too little text to split into train and val; add text or give a "
                       "separate val_file")
    val_chars = max(1, round(total * val_fraction))
    target = total - val_chars
    tolerance = val_chars // 5
    inner = ends[:-1]
    if inner:
        best = min(range(len(inner)), key=lambda i: abs(inner[i] - target))
        if abs(inner[best] - target) <= tolerance:
            return list(documents[:best + 1]), list(documents[best + 1:])
    index = bisect.bisect_right(ends, target)
    doc = documents[index]
    offset = target - (ends[index - 1] if index else 0)
    cut = _newline_cut(doc.text, offset, tolerance)
    head, tail = Document(doc.name, doc.text[:cut]), Document(doc.name, doc.text[cut:])
    return [*documents[:index], head], [tail, *documents[index + 1:]]


def _newline_cut(text: str, offset: int, tolerance: int) -> int:
    """Position just after the newline nearest `offset` (within `tolerance`), else `offset`;
    never 0 or len(text), so both halves keep some text."""
    lo, hi = max(1, offset - tolerance), min(len(text) - 1, offset + tolerance)
    left = text.rfind("\n", lo - 1, offset)
    right = text.find("\n", offset - 1, hi)
    cuts = [i + 1 for i in (left, right) if i >= 0]
    return min(cuts, key=lambda c: abs(c - offset)) if cuts else offset


def _cap_bytes(documents: list[Document], max_bytes: int) -> list[Document]:
    """The first `max_bytes` UTF-8 bytes of the documents, cut on a character boundary."""
    kept, left = [], max_bytes
    for doc in documents:
        data = doc.text.encode("utf-8")
        if len(data) >= left:
            text = data[:left].decode("utf-8", errors="ignore")
            if text:
                kept.append(Document(doc.name, text))
            break
        kept.append(doc)
        left -= len(data)
    return kept


def _sources(cfg: DataConfig) -> tuple[str, str | None, str]:
    """Training source, the validation source (None: carve val from train) and the split
    to read from the validation source."""
    if cfg.train_file is not None:
        return cfg.train_file, cfg.val_file, "train"
    assert cfg.dataset is not None  # DataConfig.validate guarantees one source
    if has_validation_split(cfg.dataset):  # the dataset's own validation split
        return cfg.dataset, cfg.dataset, "validation"
    return cfg.dataset, None, "train"


def _read(source: str, cfg: DataConfig, split: str = "train") -> list[Document]:
    return list(read_documents(source, text_field=cfg.text_field, extensions=cfg.extensions,
                               on_error=cfg.on_error, split=split))


def tokenizer_texts(cfg: DataConfig) -> Callable[[], Iterator[str]]:
    """Zero-argument callable over the training texts a tokenizer learns its vocab from, read
    with the data config's text_field, extensions and on_error, so that a tokenizer trains on
    the documents the token files will hold (not on the defaults, which fail on a JSONL whose
    text is under another key)."""
    def texts() -> Iterator[str]:
        return (doc.text for doc in _read(_sources(cfg)[0], cfg))
    return texts


def validation_documents(cfg: DataConfig) -> tuple[list[Document], str]:
    """The validation documents `prepare_dataset` uses for `cfg`, and where they came from."""
    return _load_splits(cfg, train=False)[1:]


def _load_splits(cfg: DataConfig, train: bool = True) -> tuple[list[Document], list[Document], str]:
    """Train (unless `train` is False and not needed for val) and val documents, plus a note
    on where val came from (for meta.json)."""
    train_source, val_source, val_split = _sources(cfg)
    if val_source is None:
        train_docs, val = split_documents(_read(train_source, cfg), cfg.val_fraction)
        return train_docs, val, f"last {cfg.val_fraction:g} of {train_source}"
    builtin = builtin_dataset(val_source) if val_split == "validation" else None
    val_from = str(builtin.valid) if builtin and builtin.valid else (
        f"{val_source} ({val_split} split)" if val_split != "train" else str(val_source))
    train_docs = _read(train_source, cfg) if train else []
    return train_docs, _read(val_source, cfg, val_split), val_from


def _digest(documents: Sequence[Document]) -> tuple[str, int]:
    """Content hash (names excluded, so moving a folder keeps the cache) and UTF-8 size."""
    sha, size = hashlib.sha256(), 0
    for doc in documents:
        data = doc.text.encode("utf-8")
        sha.update(len(data).to_bytes(8, "little"))
        sha.update(data)
        size += len(data)
    return sha.hexdigest(), size


def _chunks(text: str, size: int) -> Iterator[str]:
    """Pieces of at most `size` chars ending just after a newline where possible, so
    tokenizers whose pre-tokenizer splits at newlines give the same ids as on the whole."""
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            newline = text.rfind("\n", start, end)
            if newline >= start:
                end = newline + 1
        yield text[start:end]
        start = end


def _write_tokens(path: Path, documents: Sequence[Document], tokenizer: Tokenizer,
                  eos: int | None, dtype: np.dtype, desc: str, total_bytes: int) -> int:
    """Tokenize `documents` chunk by chunk into `path` (atomically), reporting the bytes and
    documents done on stderr (see utils/progress.py); returns the token count."""
    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        with open(tmp, "wb") as f, progress(total_bytes, desc=desc, unit="B", unit_scale=True, leave=False) as bar:
            for i, doc in enumerate(documents):
                if i and eos is not None:
                    f.write(np.asarray([eos], dtype=dtype).tobytes())
                    count += 1
                for chunk in _chunks(doc.text, _CHUNK_CHARS):
                    ids = np.asarray(tokenizer.encode_ids(chunk), dtype=np.int64)
                    if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
                        raise ValueError(f"{type(tokenizer).__name__} produced ids outside "
                                         f"[0, {tokenizer.vocab_size}); the tokenizer is broken")
                    f.write(ids.astype(dtype).tobytes())
                    count += ids.size
                    bar.set_postfix(documents=f"{i + 1}/{len(documents)}", refresh=False)
                    bar.update(len(chunk.encode("utf-8")))
        if count == 0:
            raise SLMError(f"{desc}: the tokenizer produced no tokens; check the data and "
                           "the tokenizer")

    atomic_write(path, write)
    return count


def prepare_dataset(cfg: DataConfig, tokenizer: Tokenizer, out_dir: str | Path) -> PreparedData:
    """Tokenize the train and val splits of `cfg` into `out_dir`, or reuse what is there.

    Reuse is decided by a fingerprint of the config, the tokenizer and the split text, so
    editing a source file or swapping tokenizers re-tokenizes while a plain rerun does not.
    The text is still read and hashed on reuse: that is cheap next to tokenizing and is the
    only way to notice edited files.
    """
    directory = Path(out_dir)
    train_docs, val_docs, val_from = _load_splits(cfg)
    if cfg.max_train_bytes is not None:
        train_docs = _cap_bytes(train_docs, cfg.max_train_bytes)
        if not train_docs:
            raise SLMError(f"DataConfig.max_train_bytes: {cfg.max_train_bytes} bytes is less "
                           "than the first character of the training text; raise the cap")
    splits = {"train": train_docs, "val": val_docs}
    digests = {name: _digest(docs) for name, docs in splits.items()}
    fingerprint = hashlib.sha256(json.dumps({
        "format": FORMAT,
        "config": cfg.to_dict(),
        "tokenizer": tokenizer.spec(),
        # spec() may not pin the vocabulary itself; ids of real text do
        "probe": tokenizer.encode_ids(train_docs[0].text[:_PROBE_CHARS]),
        "data": {name: sha for name, (sha, _) in digests.items()},
    }, sort_keys=True).encode()).hexdigest()

    if (directory / META_FILE).is_file():
        try:
            existing = load_prepared(directory)
        except SLMError:
            existing = None  # damaged: rebuild it below
        if existing is not None and existing.meta.get("fingerprint") == fingerprint:
            return dataclasses.replace(existing, reused=True)

    dtype = token_dtype(tokenizer.vocab_size)
    eos = tokenizer.eos_token_id if cfg.append_eos else None
    # Without meta.json the folder reads as "not prepared", so a failure below can never
    # leave new and old token files passing as one dataset.
    (directory / META_FILE).unlink(missing_ok=True)
    meta_splits = {
        name: {"tokens": _write_tokens(directory / f"{name}.bin", docs, tokenizer, eos, dtype,
                                       f"tokenizing {name}", digests[name][1]),
               "bytes": digests[name][1], "documents": len(docs)}
        for name, docs in splits.items()
    }
    atomic_write_json(directory / META_FILE, {
        "format": FORMAT, "fingerprint": fingerprint, "dtype": dtype.name,
        "tokenizer": tokenizer.spec(), "eos_between_documents": eos, "val_from": val_from,
        "config": cfg.to_dict(), "splits": meta_splits,
    })
    return load_prepared(directory)


def load_prepared(out_dir: str | Path) -> PreparedData:
    """Memory-map a folder written by `prepare_dataset`, checking it is complete."""
    directory = Path(out_dir)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise SLMError(f"no prepared dataset in {directory} ({META_FILE} missing); prepare "
                       f"the data first or point at the folder that holds {META_FILE}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        counts = {name: int(meta["splits"][name]["tokens"]) for name in SPLITS}
    except (ValueError, KeyError, TypeError) as err:  # bad JSON, missing keys, bad dtype
        raise SLMError(f"{meta_path} is corrupt ({type(err).__name__}: {err}); delete "
                       f"{directory} and prepare the data again") from None
    arrays = {}
    for name, count in counts.items():
        path = directory / f"{name}.bin"
        size = path.stat().st_size if path.is_file() else None
        if count <= 0 or size != count * dtype.itemsize:
            found = "is missing" if size is None else f"holds {size} bytes"
            raise SLMError(f"{path} {found} but {META_FILE} records {count} {dtype.name} "
                           f"tokens ({count * dtype.itemsize} bytes); it is truncated or from "
                           f"another run: delete {directory} and prepare the data again")
        arrays[name] = np.memmap(path, dtype=dtype, mode="r", shape=(count,))
    return PreparedData(directory, arrays["train"], arrays["val"], meta)
