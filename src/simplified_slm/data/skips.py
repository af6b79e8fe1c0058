"""What `on_error="skip"` left out of one file, summed up in one warning line.

A long run should not stop for one bad line or a few bad bytes, nor lose the whole file for
them; but silently dropping text is worse than stopping. So readers count what they see and
what they leave out (per unit: bytes, lines, records, rows, with a short reason each), and
the file gets one line: "skipped 3 of 1,200 lines in X (not JSON)". With `on_error="raise"`
the first bad item raises its own error instead.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Literal

from simplified_slm.errors import SLMError, warn

OnError = Literal["raise", "skip"]


class SkipTally:
    """Counts of the items seen and skipped in one file, per unit."""

    def __init__(self, on_error: OnError) -> None:
        self.on_error = on_error
        self.seen: Counter[str] = Counter()
        self.skipped: dict[str, Counter[str]] = {}

    def count(self, unit: str, n: int = 1) -> None:
        self.seen[unit] += n

    def bad(self, unit: str, reason: str, error: SLMError, n: int = 1) -> None:
        """Raise `error`, or in skip mode count `n` items of `unit` left out for `reason`."""
        if self.on_error != "skip":
            raise error from None  # the parser's exception is what `error` explains
        self.skipped.setdefault(unit, Counter())[reason] += n

    def report(self, path: str | Path) -> None:
        """One warning line for the file when anything was skipped."""
        parts = []
        for unit, reasons in self.skipped.items():
            why = ", ".join(reason if len(reasons) == 1 else f"{n:,} {reason}" for reason, n in reasons.items())
            parts.append((f"{sum(reasons.values()):,} of {self.seen[unit]:,} {unit}", why))
        if parts:
            (first, why), rest = parts[0], parts[1:]
            warn(f"skipped {first} in {path} ({why})" + "".join(f" and {n} ({w})" for n, w in rest))
