"""`slm generate --prompt_file`: one completion per non-blank line, each saved as it finishes.

A long run can be stopped (Ctrl-C) without losing finished work: every completion is
written and flushed the moment it ends. A `.jsonl` output is resumable: rerunning the same
command keeps the rows already there and answers only the rest; rows carry the generation
settings, so a rerun with other settings is refused rather than mixing the two. Other
outputs (a text file, stdout) start afresh. Progress goes to stderr (one line per prompt
when stderr is not a terminal). Bad lines are reported and skipped, and then the run ends
with a summary and exit code 1, so scripts notice.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

from simplified_slm.errors import SLMError
from simplified_slm.utils.resumable import append_after, earlier_rows

EXIT_SKIPPED = 1
_SETTINGS = ("model_path", "max_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "greedy", "seed")


def _read_prompts(path: Path) -> tuple[list[tuple[int, str]], int]:
    """(line number, prompt) of each non-blank line, and how many lines were not UTF-8."""
    prompts, bad = [], 0
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            prompt = raw.decode("utf-8")
        except UnicodeDecodeError:
            print(f"warning: {path}:{number} is not valid UTF-8; skipped", file=sys.stderr)
            bad += 1
            continue
        if prompt.strip():
            prompts.append((number, prompt))
    return prompts, bad


def _earlier_rows(out: Path, settings: dict) -> list[dict]:
    """The rows an interrupted run of the same command left in `out`; a last row cut off by
    a kill is dropped."""
    rows = []
    for number, row in earlier_rows(out):
        if not (isinstance(row, dict) and {"line", "prompt", "completion"} <= row.keys()):
            raise SLMError(f"--output_file {out} is not the output of a prompt-file run (line {number}); "
                           "choose another file")
        if row.get("settings") != settings:
            raise SLMError(f"--output_file {out} holds completions made with other settings or another model; "
                           "delete it or choose another file")
        rows.append(row)
    return rows


class _Progress:
    """`[done/total] line N: seconds` on stderr: rewritten in place on a terminal, else a line each."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.tty = total, 0, sys.stderr.isatty()

    def step(self, number: int, seconds: float, note: str = "") -> None:
        self.done += 1
        message = f"[{self.done}/{self.total}] line {number}: {seconds:.1f} s{note}"
        sys.stderr.write(f"\r\x1b[K{message}" if self.tty else message + "\n")
        sys.stderr.flush()

    def clear(self) -> None:
        """Wipe the in-place line before other output (a no-op off a terminal)."""
        if self.tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _as_text(row: dict) -> str:
    return f"=== prompt (line {row['line']}): {row['prompt']}\n{row['prompt']}{row['completion']}\n\n"


def run_prompt_file(args: argparse.Namespace, complete: Callable[[str], str]) -> int:
    """Complete every prompt of `args.prompt_file` with `complete`; returns the exit code."""
    path = Path(args.prompt_file)
    prompts, skipped = _read_prompts(path)
    out = Path(args.output_file) if args.output_file else None
    jsonl = out is not None and out.suffix == ".jsonl"
    settings = {key: getattr(args, key, None) for key in _SETTINGS}
    kept = _earlier_rows(out, settings) if jsonl else []
    answered = {(row["line"], row["prompt"]) for row in kept}
    todo = [(number, prompt) for number, prompt in prompts if (number, prompt) not in answered]
    if kept:
        print(f"resuming: {len(prompts) - len(todo)} of {len(prompts)} prompts already answered in {out}",
              file=sys.stderr)
    sink: TextIO = (append_after(out, kept) if jsonl else open(out, "w", encoding="utf-8")) if out else sys.stdout
    progress, written = _Progress(len(todo)), 0
    try:
        for number, prompt in todo:
            started = time.perf_counter()
            try:
                row = {"line": number, "prompt": prompt, "completion": complete(prompt)}
            except SLMError as err:
                progress.clear()
                print(f"warning: {path}:{number}: {err}; skipped", file=sys.stderr)
                skipped += 1
                progress.step(number, time.perf_counter() - started, " (skipped)")
                continue
            progress.clear()
            sink.write(json.dumps({**row, "settings": settings}) + "\n" if jsonl else _as_text(row))
            sink.flush()
            written += 1
            progress.step(number, time.perf_counter() - started)
    except KeyboardInterrupt:
        progress.clear()
        where = f"; the finished ones are in {out}" if out else ""
        again = "; rerun the same command to answer the rest" if jsonl else ""
        print(f"interrupted after {written} of {len(todo)} prompts{where}{again}", file=sys.stderr)
        raise
    finally:
        if out:
            sink.close()
    progress.clear()
    summary = f"wrote {written} completions to {out}" if out else f"generated {written} completions"
    if kept:
        summary += f" (after the {len(kept)} already there)"
    if skipped:
        summary += f"; {skipped} lines skipped (see the warnings above)"
    print(summary, file=sys.stderr)
    return EXIT_SKIPPED if skipped else 0
