"""Append-only JSONL outputs that a killed run continues: `slm generate --prompt_file` and
`slm distill traces` both write one row per finished item, flushed at once.

A kill can only cut the last line short (rows are appended whole and flushed), so on a
rerun the rows that parse are kept, a cut-off last line is dropped (the file is rewritten
atomically without it) and the caller answers only what the kept rows do not cover.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO

from simplified_slm.utils.io import atomic_write_text


def earlier_rows(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed row) of each line a previous run left in `path` (none if it does not
    exist); a last line cut off by a kill is left out, any other unparsable line is None."""
    if not path.is_file():
        return []
    lines = path.read_bytes().splitlines()
    rows = []
    for index, line in enumerate(lines):
        try:
            rows.append((index + 1, json.loads(line)))
        except ValueError:
            if index == len(lines) - 1:
                break
            rows.append((index + 1, None))
    return rows


def append_after(path: Path, kept: list[dict]) -> TextIO:
    """`path` opened for appending, holding exactly the `kept` rows (a fresh file when there
    are none); rewritten atomically first, which drops a cut-off last line."""
    if not kept:
        return open(path, "w", encoding="utf-8")
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in kept))
    return open(path, "a", encoding="utf-8")
