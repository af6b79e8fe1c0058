"""`slm generate` / `generate.py`: one prompt, interactive chat-style loop, or a prompt file.

Bad lines in a prompt file are reported and skipped; interactive mode ends cleanly on EOF
or Ctrl-C. Output streams token by token to the terminal.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from simplified_slm.errors import SLMError
from simplified_slm.models.base import CausalLM
from simplified_slm.tokenizers import Tokenizer


def complete(model: CausalLM, tokenizer: Tokenizer, prompt: str, args: argparse.Namespace,
             stream: bool = False) -> str:
    try:
        ids = tokenizer.encode_ids(prompt)
    except UnicodeEncodeError:
        raise SLMError("the prompt is not valid UTF-8 (it holds undecodable bytes); pass UTF-8 text") from None
    if not ids:
        raise SLMError("the prompt encodes to no tokens; give a non-empty prompt")
    limit = model.max_context
    if limit is not None and len(ids) > limit:
        raise SLMError(f"the prompt has {len(ids)} tokens but the model's context is {limit}; shorten it")
    printed: list[int] = []
    if stream:
        sys.stdout.write(prompt)

    def on_token(column: torch.Tensor) -> None:
        printed.append(int(column[0]))
        text = tokenizer.decode(printed)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text)
            sys.stdout.flush()
            printed.clear()

    out = model.generate(torch.tensor([ids], device=model.device), args.max_tokens, greedy=args.greedy,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         repetition_penalty=args.repetition_penalty, seed=args.seed,
                         eos_token_id=tokenizer.eos_token_id, on_token=on_token if stream else None,
                         compile=getattr(args, "compile", False))
    if stream:
        sys.stdout.write(tokenizer.decode(printed) + "\n")
    return tokenizer.decode(out[0, len(ids):])


def run_generate(model: CausalLM, tokenizer: Tokenizer, args: argparse.Namespace) -> int:
    if args.interactive:
        return _interactive(model, tokenizer, args)
    if args.prompt_file:
        return _prompt_file(model, tokenizer, args)
    text = complete(model, tokenizer, args.prompt, args, stream=args.output_file is None)
    if args.output_file:
        Path(args.output_file).write_text(args.prompt + text, encoding="utf-8")
    return 0


def _read_prompt() -> str:
    """One line from the user; from a pipe, read bytes so one undecodable line costs only itself."""
    if sys.stdin.isatty():
        return input(">>> ")
    sys.stdout.write(">>> ")
    sys.stdout.flush()
    raw = sys.stdin.buffer.readline()
    if not raw:
        raise EOFError
    return raw.rstrip(b"\r\n").decode("utf-8")


def _interactive(model: CausalLM, tokenizer: Tokenizer, args: argparse.Namespace) -> int:
    print("interactive mode: type a prompt, empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            prompt = _read_prompt()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        except UnicodeDecodeError:
            print("error: the line is not valid UTF-8; type UTF-8 text", file=sys.stderr)
            continue
        if not prompt:
            return 0
        try:
            complete(model, tokenizer, prompt, args, stream=True)
        except SLMError as err:
            print(f"error: {err}", file=sys.stderr)
        except KeyboardInterrupt:
            print("\n(interrupted)", file=sys.stderr)


def _prompt_file(model: CausalLM, tokenizer: Tokenizer, args: argparse.Namespace) -> int:
    path = Path(args.prompt_file)
    if not path.is_file():
        raise SLMError(f"prompt file {path} does not exist")
    raw_lines = path.read_bytes().splitlines()
    results, failures = [], 0
    for number, raw in enumerate(raw_lines, start=1):
        try:
            prompt = raw.decode("utf-8")
        except UnicodeDecodeError:
            print(f"warning: {path}:{number} is not valid UTF-8; skipped", file=sys.stderr)
            failures += 1
            continue
        if not prompt.strip():
            continue
        try:
            results.append({"line": number, "prompt": prompt, "completion": complete(model, tokenizer, prompt, args)})
        except SLMError as err:
            print(f"warning: {path}:{number}: {err}; skipped", file=sys.stderr)
            failures += 1
    if args.output_file:
        out = Path(args.output_file)
        if out.suffix == ".jsonl":
            out.write_text("".join(json.dumps(r) + "\n" for r in results), encoding="utf-8")
        else:
            out.write_text("".join(f"=== prompt (line {r['line']}): {r['prompt']}\n{r['prompt']}{r['completion']}\n\n"
                                   for r in results), encoding="utf-8")
        print(f"wrote {len(results)} completions to {out}" + (f" ({failures} lines skipped)" if failures else ""),
              file=sys.stderr)
    else:
        for r in results:
            print(f"=== {r['prompt']}\n{r['prompt']}{r['completion']}\n")
    return 0
