"""The unit every data source yields (kept apart so the format readers share it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Document:
    """One unit of text; documents are never concatenated without an EOS between them."""

    name: str
    text: str
