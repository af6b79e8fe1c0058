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

from simplified_slm.cli.sampling_args import add_sampling_args
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
    add_sampling_args(p, max_tokens=256, temperature=0.7)
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
    from simplified_slm.cli.generate_cmd import typed_lines
    from simplified_slm.tokenizers.chat_template import ChatTemplate

    template = ChatTemplate.for_tokenizer(tokenizer, args.chat_template)
    start: list[Message] = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    print(f"chat ({template.kind} template): type a message, {RESET} to start over, Ctrl-D to quit",
          file=sys.stderr)
    for line in typed_lines():
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
    return 0
