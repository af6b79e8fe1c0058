"""From token ids to the text a client sees: incremental decoding, stop sequences, chat prompts.

A streamed reply must never show half a UTF-8 character or the start of a stop sequence
that later completes, so `TextStream` holds such tails back until they resolve. Chat
prompts use the model's own template when its folder ships one (transformers'
`chat_template` in tokenizer_config.json, or chat_template.jinja), rendered in jinja2's
sandbox as transformers does; otherwise a plain "User: ...\\nAssistant:" transcript.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

from simplified_slm.errors import SLMError

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
# the plain transcript would otherwise run on into the next turn
PLAIN_STOP = "\nUser:"


class TextStream:
    """Decodes one choice's growing token list into text deltas, honouring stop strings."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str]) -> None:
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already handed out
        self.text = ""

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (new text safe to show, whether a stop sequence was hit)."""
        self.ids.append(token)
        self.text = self.decode(self.ids)
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return self._take(len(self.text)), True
        end = len(self.text)
        if self.text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            end -= 1
        end -= max((n for s in self.stop for n in range(1, len(s)) if self.text[:end].endswith(s[:n])), default=0)
        return self._take(end), False

    def flush(self) -> str:
        """The held-back tail, when the choice ends for another reason than a stop string."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        delta = self.text[self.sent:max(end, self.sent)]
        self.sent = max(end, self.sent)
        return delta


def _token_text(value: Any) -> str:
    return value.get("content", "") if isinstance(value, dict) else (value or "")


class ChatFormat:
    """Turns OpenAI chat messages into one prompt string for this model."""

    def __init__(self, model_dir: str | Path | None) -> None:
        self.template = None
        self.extra_stop: list[str] = [PLAIN_STOP]
        self.specials: dict[str, str] = {}
        folder = Path(model_dir) if model_dir else None
        if folder is not None and folder.is_file():  # e.g. .../model.safetensors, as slm generate accepts
            folder = folder.parent
        if folder is None or not folder.is_dir():
            return
        config_path, jinja_path = folder / "tokenizer_config.json", folder / "chat_template.jinja"
        config: dict[str, Any] = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as err:
                raise SLMError(f"{config_path} is not valid JSON ({err}); fix or remove it") from None
        source = jinja_path.read_text(encoding="utf-8") if jinja_path.is_file() else config.get("chat_template")
        if isinstance(source, list):  # named templates: take "default"
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        if not source:
            return
        self.template = _compile(source)
        self.extra_stop = []
        self.specials = {"bos_token": _token_text(config.get("bos_token")),
                         "eos_token": _token_text(config.get("eos_token"))}

    @property
    def kind(self) -> str:
        return "model template" if self.template is not None else "plain"

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        if self.template is not None:
            try:
                return self.template.render(messages=list(messages), add_generation_prompt=True, **self.specials)
            except Exception as err:  # the template's own raise_exception or a rendering error
                raise ValueError(f"the model's chat template rejected the messages: {err}") from None
        lines = [f"{PLAIN_ROLES.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nAssistant:"


def _compile(source: str) -> Any:
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise SLMError("the model ships a chat template, which needs jinja2: pip install jinja2") from None

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateError as err:
        raise SLMError(f"the model's chat template does not compile: {err}") from None
