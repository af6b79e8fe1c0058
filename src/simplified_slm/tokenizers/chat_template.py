"""Chat templates: messages -> one prompt string, for serving, SFT data and `slm chat`.

One implementation serves all three, so a model is fine-tuned on exactly the text it is
later prompted with. The template is the tokenizer's own (transformers' `chat_template`,
rendered in jinja2's sandbox as transformers does: SmolLM2's GGUF and transformers
folders ship one, and `Tokenizer.save` keeps it), else the named default `plain`:

    System: ...\\nUser: ...\\nAssistant: <reply><eos>\\n ... Assistant:

(`<eos>` is the tokenizer's eos text where it has one; the stop string "\\nUser:" ends an
untrained model's reply). `segments` cuts a rendered conversation into prompt and
assistant parts by rendering it turn by turn, which is what answer-only loss needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from simplified_slm.errors import SLMError

Message = dict[str, str]
TEMPLATE_FILE = "chat_template.jinja"  # transformers >= 4.43 writes the template here
DEFAULT_TEMPLATE_NAME = "plain"
# the named default for tokenizers without a template of their own (see the module docstring)
PLAIN_TEMPLATE = (
    "{%- set names = {'system': 'System', 'user': 'User', 'assistant': 'Assistant'} -%}"
    "{%- for m in messages -%}"
    "{{ names.get(m['role'], m['role'] | capitalize) }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}"
    "{%- endfor -%}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")
PLAIN_STOP = "\nUser:"  # the plain transcript would otherwise run on into the next turn


def read_chat_template(folder: str | Path) -> str | None:
    """The template a tokenizer or model folder ships: `chat_template.jinja`, else the
    `chat_template` field of tokenizer_config.json (a named list: its "default")."""
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    jinja_path, config_path = folder / TEMPLATE_FILE, folder / "tokenizer_config.json"
    if jinja_path.is_file():
        return jinja_path.read_text(encoding="utf-8") or None
    if not config_path.is_file():
        return None
    try:
        source = json.loads(config_path.read_text(encoding="utf-8")).get("chat_template")
    except (ValueError, UnicodeDecodeError, AttributeError) as err:
        raise SLMError(f"{config_path} is not a valid JSON mapping ({err}); fix or remove it") from None
    if isinstance(source, list):
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    return source if isinstance(source, str) and source else None


class ChatTemplate:
    """A compiled chat template with the special-token strings it may use."""

    def __init__(self, source: str | None = None, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source or PLAIN_TEMPLATE
        self.kind = "model template" if source else DEFAULT_TEMPLATE_NAME
        self.extra_stop: list[str] = [] if source else [PLAIN_STOP]
        self.specials = {"bos_token": bos_token, "eos_token": eos_token}
        self.template = _compile(self.source)

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, name: str | None = None) -> "ChatTemplate":
        """The tokenizer's own template (`name` = "plain" forces the default), with its
        bos/eos strings where they round-trip to their ids."""
        if name not in (None, DEFAULT_TEMPLATE_NAME):
            raise SLMError(f"unknown chat template {name!r}; use {DEFAULT_TEMPLATE_NAME!r} or leave it unset "
                           "for the tokenizer's own")
        source = None if name == DEFAULT_TEMPLATE_NAME else getattr(tokenizer, "chat_template", None)
        return cls(source, _special_text(tokenizer, "bos_token_id"), _special_text(tokenizer, "eos_token_id"))

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                        **self.specials)
        except Exception as err:  # the template's own raise_exception or a rendering error
            raise ValueError(f"the chat template rejected the messages: {err}") from None

    def segments(self, messages: Sequence[Message]) -> list[tuple[str, bool]]:
        """The whole conversation as (text, is_assistant_reply) parts, in order.

        Each reply is what rendering up to and including it adds to the prompt that asks
        for it (so it ends with the template's end-of-turn text, which the model must learn
        to emit). Templates that rewrite earlier turns once later ones exist cannot be cut
        this way and are refused.
        """
        parts: list[tuple[str, bool]] = []
        done = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            full = self.render(messages[:i + 1], add_generation_prompt=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise SLMError("the chat template does not render a conversation turn by turn (a later turn "
                               "changes the text of an earlier one), so replies cannot be told from prompts; "
                               f"use data.chat_template: {DEFAULT_TEMPLATE_NAME}")
            parts += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
        rest = self.render(messages, add_generation_prompt=False)[len(done):]
        return [(text, reply) for text, reply in parts + [(rest, False)] if text]


def _special_text(tokenizer: Any, attribute: str) -> str:
    """The text of a special id, if encoding that text gives the id back (else "")."""
    token_id = getattr(tokenizer, attribute, None)
    if token_id is None:
        return ""
    text = tokenizer.decode([token_id])
    return text if tokenizer.encode_ids(text) == [token_id] else ""


def _compile(source: str) -> Any:
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise SLMError("chat templates need jinja2: pip install jinja2") from None

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateError as err:
        raise SLMError(f"the chat template does not compile: {err}") from None
