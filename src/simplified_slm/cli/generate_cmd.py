"""`slm generate` / `generate.py`: one prompt, interactive chat-style loop, or a prompt file.

Arguments are checked before anything loads or prints; interactive mode ends cleanly on EOF
or Ctrl-C; output streams token by token to the terminal. Prompt files: `prompt_file.py`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator

import torch

from simplified_slm.cli.outputs import check_output_file
from simplified_slm.cli.prompt_file import run_prompt_file
from simplified_slm.errors import SLMError
from simplified_slm.generation.generate import check_sampling_args
from simplified_slm.models.base import CausalLM
from simplified_slm.tokenizers import Tokenizer
from simplified_slm.utils.io import atomic_write_text


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
                         compile=getattr(args, "compile", False),
                         kv_cache_dtype=getattr(args, "kv_cache_dtype", None))
    if stream:
        sys.stdout.write(tokenizer.decode(printed) + "\n")
    return tokenizer.decode(out[0, len(ids):])


def check_generate_args(args: argparse.Namespace) -> None:
    """Every argument that can be wrong, checked before the model loads or anything is printed."""
    check_sampling_args(args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        repetition_penalty=args.repetition_penalty)
    if args.prompt_file and not Path(args.prompt_file).is_file():
        raise SLMError(f"prompt file {args.prompt_file} does not exist")
    if args.output_file:
        if args.interactive:
            raise SLMError("--output_file is not used with --interactive; drop one of them")
        check_output_file(args.output_file, "--output_file")


def run_generate(model: CausalLM, tokenizer: Tokenizer, args: argparse.Namespace) -> int:
    if args.interactive:
        return _interactive(model, tokenizer, args)
    if args.prompt_file:
        return run_prompt_file(args, lambda prompt: complete(model, tokenizer, prompt, args))
    text = complete(model, tokenizer, args.prompt, args, stream=args.output_file is None)
    if args.output_file:
        atomic_write_text(args.output_file, args.prompt + text)
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


def typed_lines() -> Iterator[str]:
    """The user's lines until EOF or Ctrl-C; a line that is not UTF-8 is reported and skipped."""
    while True:
        try:
            yield _read_prompt()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        except UnicodeDecodeError:
            print("error: the line is not valid UTF-8; type UTF-8 text", file=sys.stderr)


def _interactive(model: CausalLM, tokenizer: Tokenizer, args: argparse.Namespace) -> int:
    print("interactive mode: type a prompt, empty line or Ctrl-D to quit", file=sys.stderr)
    for prompt in typed_lines():
        if not prompt:
            return 0
        try:
            complete(model, tokenizer, prompt, args, stream=True)
        except SLMError as err:
            print(f"error: {err}", file=sys.stderr)
        except KeyboardInterrupt:
            print("\n(interrupted)", file=sys.stderr)
    return 0
