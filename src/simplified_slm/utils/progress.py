"""Progress for long work on stderr: a tqdm bar on a terminal, plain lines anywhere else.

tqdm redraws one line with carriage returns: right on a terminal, junk in a pipe or a log
file, where every redraw is kept. `progress()` returns tqdm when the stream is a TTY and a
`LineProgress` otherwise, which writes one complete line at most every `interval_s` seconds
(`SLM_PROGRESS_INTERVAL`, default 10) and a last one on close, so work shorter than one
interval prints nothing. Both take tqdm's
`total/initial/desc/unit/unit_scale/disable` and have `update/set_postfix/close`, so callers
never ask which one they got. `heartbeat()` covers work that cannot count its own progress
(a library call such as HF's BPE trainer): a line every interval while it runs.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Any, Iterable, Iterator, TextIO

from tqdm import tqdm

DEFAULT_INTERVAL_S = 10.0
INTERVAL_ENV = "SLM_PROGRESS_INTERVAL"


def _interval_from_env() -> float:
    raw = os.environ.get(INTERVAL_ENV)
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_INTERVAL_S
    except ValueError:
        return DEFAULT_INTERVAL_S  # a progress knob is not worth stopping a run for


class LineProgress:
    """tqdm's counting surface, reported as whole lines: `desc: n/total unit (p%), rate, eta, postfix`."""

    def __init__(self, total: float | None = None, *, initial: float = 0, desc: str = "", unit: str = "it",
                 unit_scale: bool = False, disable: bool = False, file: TextIO | None = None) -> None:
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.unit_scale, self.disable = unit_scale, disable
        self.file = file
        self.interval_s = _interval_from_env()
        self._postfix = ""
        self._start_n = initial
        self._started = self._last = time.monotonic()
        self._reported_n = initial
        self._closed = False

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        if not self.disable and time.monotonic() - self._last >= self.interval_s:
            self._report()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        """A last line for work that took at least one interval; short work stays quiet."""
        long_work = time.monotonic() - self._started >= self.interval_s
        if not self._closed and not self.disable and self.n != self._reported_n and long_work:
            self._report()
        self._closed = True

    def _amount(self, value: float) -> str:
        if self.unit_scale:
            return tqdm.format_sizeof(value)
        return f"{value:,.0f}" if value >= 100 or value == int(value) else f"{value:.2g}"

    def _report(self) -> None:
        now = time.monotonic()
        elapsed = max(now - self._started, 1e-9)
        rate = (self.n - self._start_n) / elapsed
        gap = "" if self.unit_scale else " "  # 12.3MB as tqdm writes it, but 120 step
        done = self._amount(self.n) + (f"/{self._amount(self.total)}" if self.total else "")
        parts = [f"{done}{gap}{self.unit}" + (f" ({100 * self.n / self.total:.0f}%)" if self.total else ""),
                 f"{self._amount(rate)}{gap}{self.unit}/s"]
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"{tqdm.format_interval((self.total - self.n) / rate)} left")
        else:
            parts.append(f"{tqdm.format_interval(elapsed)} elapsed")
        if self._postfix:
            parts.append(self._postfix)
        prefix = f"{self.desc}: " if self.desc else ""
        write_line(prefix + ", ".join(parts), self.file or sys.stderr)
        self._last, self._reported_n = now, self.n


_WRITE_LOCK = threading.Lock()


def write_line(text: str, stream: TextIO) -> None:
    """One whole line in one write: `print` writes the text and the newline separately, so a
    heartbeat thread printing beside a progress line could glue two lines together."""
    with _WRITE_LOCK:
        stream.write(text + "\n")
        stream.flush()


def progress(total: float | None = None, *, initial: float = 0, desc: str = "", unit: str = "it",
             unit_scale: bool = False, disable: bool = False, leave: bool = True,
             file: TextIO | None = None) -> tqdm | LineProgress:
    """A tqdm bar when `file` (default stderr) is a terminal, else a `LineProgress`."""
    stream = file or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale,
                    disable=disable, leave=leave, file=stream, dynamic_ncols=True)
    return LineProgress(total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale,
                        disable=disable, file=stream)


def texts_with_progress(texts: Iterable[str], desc: str) -> Iterator[str]:
    """Pass `texts` through, reporting the UTF-8 bytes and documents read so far."""
    documents = 0
    with progress(desc=desc, unit="B", unit_scale=True) as bar:
        for text in texts:
            documents += 1
            bar.set_postfix(documents=documents, refresh=False)
            bar.update(len(text.encode("utf-8")))
            yield text


@contextlib.contextmanager
def heartbeat(desc: str, file: TextIO | None = None) -> Iterator[None]:
    """While the block runs, off a terminal: "desc: 10s elapsed" every interval from a
    background thread (the work must release the GIL, as native libraries do), and
    "desc: done in 25s" at the end if any line was written. On a terminal: nothing, since
    the libraries that need this draw their own bars there."""
    stream = file or sys.stderr
    interval = _interval_from_env()
    if getattr(stream, "isatty", lambda: False)() or interval <= 0:  # 0 would spin: no beats
        yield
        return
    stop, started, beats = threading.Event(), time.monotonic(), []

    def beat() -> None:
        while not stop.wait(interval):
            beats.append(1)
            write_line(f"{desc}: {tqdm.format_interval(time.monotonic() - started)} elapsed", stream)

    thread = threading.Thread(target=beat, name="slm-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if beats:
            write_line(f"{desc}: done in {tqdm.format_interval(time.monotonic() - started)}", stream)
