"""`slm chat --model_path P`: an interactive multi-turn chat on stdin/stdout.

Each turn renders the whole history with the model's chat template (the one SFT trained
on, `tokenizers/chat_template.py`) plus the generation prompt, and streams the reply until
the tokenizer's eos, a template stop string or `--max_tokens`. `/reset` clears the history
(keeping `--system`); EOF (Ctrl-D) or Ctrl-C ends the session. The heavy imports wait
inside the functions, so building the `slm` parser stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from simplified_slm.errors import SLMError

if TYPE_CHECKING:
    from simplified_slm.models.base import CausalLM
    from simplified_slm.tokenizers import Tokenizer
    from simplified_slm.tokenizers.chat_template import ChatTemplate, Message

RESET = "/reset"
PLAIN = "plain"  # tokenizers.chat_template.DEFAULT_TEMPLATE_NAME


def add_chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_path", "--model-path", required=True,
                   help="checkpoint or model folder, transformers folder or .gguf file")
    p.add_argument("--system", help="a system message at the start of every conversation")
    p.add_argument("--chat_template", "--chat-template", choices=[PLAIN],
                   help="use the named default template instead of the tokenizer's own")
    p.add_argument("--max_tokens", "--max-tokens", type=int, default=256, help="most tokens per reply")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top_k", "--top-k", type=int)
    p.add_argument("--top_p", "--top-p", type=float)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="auto")


def check_chat_args(args: argparse.Namespace) -> None:
    from simplified_slm.generation.generate import check_sampling_args

    check_sampling_args(args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        repetition_penalty=args.repetition_penalty)


def reply(model: CausalLM, tokenizer: Tokenizer, template: ChatTemplate, history: list[Message],
          args: argparse.Namespace) -> str:
    """Generate (and stream to stdout) the assistant's answer to `history`."""
    import torch

    from simplified_slm.serving.text import TextStream

    ids = tokenizer.encode_ids(template.render(history, add_generation_prompt=True))
    limit = model.max_context
    if limit is not None and len(ids) + 1 > limit:
        raise SLMError(f"the conversation has {len(ids)} tokens, the model's context is {limit}; type {RESET}")
    stream = TextStream(tokenizer.decode, template.extra_stop)
    stopped = False

    def on_token(column: torch.Tensor) -> None:
        nonlocal stopped
        token = int(column[0])
        if stopped or token == tokenizer.eos_token_id:
            stopped = True
            return
        text, stopped = stream.push(token)
        sys.stdout.write(text)
        sys.stdout.flush()

    model.generate(torch.tensor([ids], device=model.device), args.max_tokens, greedy=args.greedy,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   repetition_penalty=args.repetition_penalty, seed=args.seed,
                   eos_token_id=tokenizer.eos_token_id, on_token=on_token, stop_when=lambda _: stopped)
    if not stopped:
        sys.stdout.write(stream.flush())
    sys.stdout.write("\n")
    sys.stdout.flush()
    return stream.text


def run_chat(model: CausalLM, tokenizer: Tokenizer, args: argparse.Namespace) -> int:
    from simplified_slm.cli.generate_cmd import _read_prompt
    from simplified_slm.tokenizers.chat_template import ChatTemplate

    template = ChatTemplate.for_tokenizer(tokenizer, args.chat_template)
    start: list[Message] = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    print(f"chat ({template.kind} template): type a message, {RESET} to start over, Ctrl-D to quit",
          file=sys.stderr)
    while True:
        try:
            line = _read_prompt()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        except UnicodeDecodeError:
            print("error: the line is not valid UTF-8; type UTF-8 text", file=sys.stderr)
            continue
        if line.strip() == RESET:
            history = list(start)
            print("(history cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            history.append({"role": "assistant", "content": reply(model, tokenizer, template, history, args)})
        except SLMError as err:
            history.pop()
            print(f"error: {err}", file=sys.stderr)
        except KeyboardInterrupt:
            history.pop()
            print("\n(interrupted)", file=sys.stderr)
