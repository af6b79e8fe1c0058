"""Local Hugging Face `datasets` files (parquet, csv, arrow, `save_to_disk` folders), offline.

`datasets` is kept optional because it is heavy and most users of the text formats never
need it. It reads its offline switch (`HF_DATASETS_OFFLINE`) once, at import, so setting
the environment variable is not enough when something imported it earlier: every call
here goes through `offline_datasets()`, which flips the live flags for its duration, so
reading a local file can never turn into a download or a Hub request.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from simplified_slm.data.document import Document
from simplified_slm.data.skips import SkipTally
from simplified_slm.errors import SLMError
from simplified_slm.utils.progress import heartbeat

HF_FILE_FORMATS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_SAVED_DATASET_FILES = ("dataset_info.json", "state.json")  # Dataset.save_to_disk
_SAVED_DICT_FILE = "dataset_dict.json"  # DatasetDict.save_to_disk
_OFFLINE_ENV = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


@contextlib.contextmanager
def offline_datasets(what: str) -> Iterator[Any]:
    """The `datasets` module with every offline switch on (restored afterwards).

    `what` names the file being read, for the error when `datasets` is not installed. Off a
    terminal its tqdm bars ("Generating train split") are turned off for the duration, since
    their carriage-return redraws are junk in a log file; a heartbeat line keeps time instead.
    """
    try:
        import datasets
        import huggingface_hub.constants as hub
    except ImportError:
        raise SLMError(f"{what}: reading it needs Hugging Face datasets; pip install datasets "
                       "(or convert the data to .jsonl or .txt)") from None
    saved_env = {name: os.environ.get(name) for name in _OFFLINE_ENV}
    # the flag's name differs across versions (datasets 2.x: HF_DATASETS_OFFLINE only)
    flags = [(module, name) for module in (datasets.config, hub) for name in _OFFLINE_ENV
             if hasattr(module, name)]
    saved = [getattr(module, name) for module, name in flags]
    os.environ.update(dict.fromkeys(_OFFLINE_ENV, "1"))
    for module, name in flags:
        setattr(module, name, True)
    bars_off = not sys.stderr.isatty() and datasets.is_progress_bar_enabled()
    if bars_off:
        datasets.disable_progress_bars()
    try:
        with heartbeat(f"reading {what}"):
            yield datasets
    finally:
        if bars_off:
            datasets.enable_progress_bars()
        for (module, name), value in zip(flags, saved):
            setattr(module, name, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


def load_files(paths: Sequence[Path], fmt: str, where: str, **options: Any) -> Any:
    """One `datasets.Dataset` of local files in builder format `fmt` (parquet, csv, text,
    arrow), in the order given. `options` go to the builder (e.g. keep_linebreaks)."""
    with offline_datasets(where) as datasets:
        try:
            if fmt == "arrow":
                parts = [datasets.Dataset.from_file(str(p)) for p in paths]
                return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
            return datasets.load_dataset(fmt, data_files=[str(p) for p in paths], split="train",
                                         download_mode="reuse_dataset_if_exists", **options)
        except Exception as err:  # datasets/pyarrow raise many unrelated types for bad files
            raise SLMError(f"{where}: cannot load it as {fmt} ({_first_line(err)}); check the file") from None


def is_saved_dataset(folder: Path) -> bool:
    """True for a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (folder / _SAVED_DICT_FILE).is_file() or all((folder / n).is_file() for n in _SAVED_DATASET_FILES)


def saved_splits(folder: Path) -> list[str]:
    """Split names of a saved DatasetDict folder; [] for a single saved Dataset."""
    path = folder / _SAVED_DICT_FILE
    if not path.is_file():
        return []
    try:
        splits = json.loads(path.read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SLMError(f"{path} is not a datasets split list ({_first_line(err)}); save the dataset "
                       "again with DatasetDict.save_to_disk") from None
    return [str(s) for s in splits]


def load_saved(folder: Path, split: str) -> Any:
    """The rows of a `save_to_disk` folder; for a DatasetDict, those of `split`."""
    splits = saved_splits(folder)
    if splits and split not in splits:
        raise SLMError(f"{folder} has no '{split}' split (found: {', '.join(splits)}); save one "
                       f"under that name or point the data config at a file")
    with offline_datasets(str(folder)) as datasets:
        try:
            table = datasets.load_from_disk(str(folder))
        except Exception as err:
            raise SLMError(f"{folder}: cannot load this save_to_disk folder ({_first_line(err)}); "
                           "save the dataset again") from None
    return table[split] if splits else table


def text_documents(table: Any, where: str, text_field: str, tally: SkipTally) -> list[Document]:
    """One document per row of the `text_field` column; empty/missing values are skipped,
    a row whose value is not text raises or, in skip mode, is counted and left out."""
    if text_field not in table.column_names:
        found = ", ".join(table.column_names)
        raise SLMError(f"{where}: no '{text_field}' column (found: {found}); "
                       "set the data config's text_field to the text column")
    documents = []
    for i, text in enumerate(table[text_field]):
        tally.count("rows")
        if text is None:
            continue  # missing values are common in tabular data; they hold no text
        if not isinstance(text, str):
            kind = type(text).__name__
            tally.bad("rows", f"'{text_field}' is {kind}", SLMError(
                f"{where}: row {i} '{text_field}' is {kind}, not text; set text_field to a string "
                "column or set on_error='skip'"))
            continue
        documents.append(Document(f"{where}[{i}]", text))
    return documents
