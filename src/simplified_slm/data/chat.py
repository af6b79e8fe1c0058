"""Chat / instruction data for supervised fine-tuning, with loss on the answers only.

A JSONL line is a conversation: `{"messages": [{"role", "content"}, ...]}`, or
`{"prompt", "completion"}` (one user turn, one reply), or GSM8K's `{"question", "answer"}`
(the same). It is rendered with the chat template (`tokenizers/chat_template.py`, the one
serving and `slm chat` use), each part tokenized on its own, and every id outside an
assistant reply gets the label -100 (ignored by `next_token_loss`), so prompt tokens get no
gradient. A reply includes the template's end-of-turn text, so the model learns to stop.

Batches hold whole examples, right-padded to the longest one (at most `block_size` + 1
tokens; longer ones are cut on the right): causal attention never lets a real token see
the padding after it, positions start at 0 in every row, and padded targets are -100, so
each example computes exactly as it would alone (tested) with no attention mask. Like
`BatchSampler`, the batch of a step is a pure function of (seed, step), so resume is exact.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from simplified_slm.data.prepare import DataConfig
from simplified_slm.data.sampler import SAMPLER_MODES
from simplified_slm.errors import SLMError, warn
from simplified_slm.tokenizers.base import Tokenizer
from simplified_slm.tokenizers.chat_template import ChatTemplate, Message

IGNORE = -100  # the label of a token that is not trained on (prompt, padding)
ROLES = ("system", "user", "assistant")


@dataclass
class ChatExample:
    """One tokenized conversation; `prompt`/`reference` are its last reply's question and answer."""

    ids: np.ndarray  # int64 token ids of the whole rendered conversation
    labels: np.ndarray  # the same ids on assistant replies, IGNORE elsewhere
    prompt: list[Message] = field(default_factory=list)  # messages before the last reply
    reference: str = ""  # the last reply's content


@dataclass
class ChatData:
    """What `prepare_chat` returns; the trainer uses it where token data would be."""

    train: list[ChatExample]
    val: list[ChatExample]
    meta: dict[str, Any]


def conversation(record: Any, where: str) -> list[Message]:
    """The messages of one JSONL record in any accepted shape, checked."""
    if isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
    elif isinstance(record, dict) and "prompt" in record and "completion" in record:
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["completion"]}]
    elif isinstance(record, dict) and "question" in record and "answer" in record:  # GSM8K
        messages = [{"role": "user", "content": record["question"]},
                    {"role": "assistant", "content": record["answer"]}]
    else:
        raise SLMError(f"{where}: expected {{\"messages\": [...]}}, {{\"prompt\", \"completion\"}} or "
                       "{\"question\", \"answer\"}; fix the line")
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages):
        raise SLMError(f"{where}: messages must be a list of {{\"role\": one of {list(ROLES)}, \"content\": text}}")
    if not any(m["role"] == "assistant" for m in messages):
        raise SLMError(f"{where}: the conversation has no assistant reply to train on; add one")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_conversations(path: str | Path, on_error: str = "raise") -> list[list[Message]]:
    """Every conversation in a JSONL file; `on_error` "skip" leaves bad lines out (one warning)."""
    path = Path(path)
    if not path.is_file():
        raise SLMError(f"chat data file {path} does not exist; pass a JSONL file of conversations")
    out, bad = [], 0
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                try:
                    record = json.loads(line)
                except ValueError as err:
                    raise SLMError(f"{where}: not valid JSON ({err}); fix the line") from None
                out.append(conversation(record, where))
            except SLMError:
                if on_error != "skip":
                    raise
                bad += 1
    if bad:
        warn(f"{path}: skipped {bad} malformed line(s) (data.on_error = skip)")
    if not out:
        raise SLMError(f"{path} holds no conversations; add JSONL lines")
    return out


def encode_conversation(messages: Sequence[Message], template: ChatTemplate,
                        tokenizer: Tokenizer) -> ChatExample:
    """Token ids and answer-only labels; each template part is tokenized on its own, as a
    prompt is at inference (so the reply's ids follow the prompt's exactly as generated)."""
    ids: list[int] = []
    labels: list[int] = []
    for text, reply in template.segments(messages):
        part = tokenizer.encode_ids(text)
        ids += part
        labels += part if reply else [IGNORE] * len(part)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return ChatExample(np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64),
                       list(messages[:last]), messages[last]["content"])


def prepare_chat(cfg: DataConfig, tokenizer: Tokenizer, directory: Path | None = None) -> ChatData:
    """Train and validation examples from `train_file` (or a phase's `dataset`) and `val_file`;
    without a val_file the last `val_fraction` of the conversations is held out.
    `directory` is accepted for the trainer's data-preparing signature; nothing is cached
    (tokenizing thousands of short conversations takes well under a second)."""
    template = ChatTemplate.for_tokenizer(tokenizer, cfg.chat_template)
    source = cfg.train_file or cfg.dataset
    if source is None:
        raise SLMError("data.format chat needs data.train_file (a JSONL file of conversations)")
    train = read_conversations(source, cfg.on_error)
    if cfg.val_file is not None:
        val = read_conversations(cfg.val_file, cfg.on_error)
    else:
        if len(train) < 2:
            raise SLMError(f"{source} has one conversation, nothing to hold out; add more or set data.val_file")
        held = max(1, round(len(train) * cfg.val_fraction))
        train, val = train[:-held], train[-held:]
    encoded = [[encode_conversation(m, template, tokenizer) for m in split] for split in (train, val)]
    digest = hashlib.sha256(template.source.encode())
    for example in encoded[0] + encoded[1]:
        digest.update(example.ids.tobytes() + example.labels.tobytes())
    meta = {"format": "chat", "template": template.kind, "train_examples": len(encoded[0]),
            "val_examples": len(encoded[1]), "fingerprint": digest.hexdigest()[:16]}
    return ChatData(encoded[0], encoded[1], meta)


def pad_examples(examples: Sequence[ChatExample], block_size: int,
                 pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of whole examples, right-padded: x = ids[:-1], y = labels[1:], both (B, width)
    with width the longest example's (at most block_size); pad targets are IGNORE."""
    width = min(block_size, max(len(e.ids) for e in examples) - 1)
    x = torch.full((len(examples), max(width, 1)), pad_id, dtype=torch.long)
    y = torch.full_like(x, IGNORE)
    for row, example in enumerate(examples):
        n = min(len(example.ids) - 1, width)
        x[row, :n] = torch.from_numpy(example.ids[:n])
        y[row, :n] = torch.from_numpy(example.labels[1:n + 1])
    return x, y


class ChatBatchSampler:
    """Training batches of whole examples; the same call shape as `data.BatchSampler`, so
    curriculum phases use either. "random" draws examples with replacement per (seed, step);
    "sequential" walks them in order and wraps around."""

    def __init__(self, examples: Sequence[ChatExample], block_size: int, batch_size: int, seed: int,
                 mode: str = "random") -> None:
        if mode not in SAMPLER_MODES:
            raise SLMError(f"sampler mode {mode!r} is unknown; choose one of {list(SAMPLER_MODES)}")
        if not examples:
            raise SLMError("no chat examples to train on; check data.train_file")
        if batch_size < 1 or block_size < 1:
            raise SLMError(f"batch_size and block_size must be at least 1, got {batch_size} and {block_size}")
        self.examples, self.block_size, self.batch_size, self.seed, self.mode = (
            list(examples), block_size, batch_size, seed, mode)
        cut = sum(len(e.ids) - 1 > block_size for e in self.examples)
        if cut:
            warn(f"{cut} of {len(self.examples)} chat examples are longer than block_size + 1 = {block_size + 1} "
                 "tokens and are cut on the right; raise train.block_size to keep their answers whole")

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "random":
            picks = np.random.default_rng([self.seed, step]).integers(0, len(self.examples), size=self.batch_size)
        else:
            picks = (step * self.batch_size + np.arange(self.batch_size)) % len(self.examples)
        return pad_examples([self.examples[i] for i in picks], self.block_size)
