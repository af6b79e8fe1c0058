"""The one tokenizer protocol every family, dataset and metric talks to.

Byte, char and BPE tokenizers differ in how text becomes ids; everything downstream only
needs ids, the vocab size, the special ids, and how many UTF-8 bytes each id stands for
(the denominator of bits-per-byte, the project's cross-tokenizer quality number).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from simplified_slm.errors import SLMError

TOKENIZER_CONFIG = "tokenizer_config.json"
# Our config under its own name, in folders whose tokenizer_config.json belongs to
# transformers (exports for AutoTokenizer); `load_tokenizer` prefers it when present.
SLM_TOKENIZER_CONFIG = "slm_tokenizer_config.json"


def as_id_list(ids: Any) -> list[int]:
    """Accept a list, numpy array or torch tensor of ids (1-D) and return a list of ints."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):
        raise SLMError("decode takes one sequence of ids; call it once per sequence")
    return [int(i) for i in ids]


def as_text(text: str | bytes) -> str:
    """Text of `text`, bytes read as UTF-8 with U+FFFD for invalid sequences.

    Character-based tokenizers cannot represent arbitrary bytes; replacing (not raising)
    means a corpus file with a few bad bytes still tokenizes instead of aborting a run.
    """
    return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text


class Tokenizer(ABC):
    """Text <-> ids. Subclasses set `kind` and implement the abstract methods."""

    kind: str = ""
    # Batches are padded on the right: causal models then see every real token at the
    # position it has alone, and the mask only hides the tail. (Prompts for batched
    # generation are left-padded by `generate` itself.)
    padding_side: str = "right"
    pad_token_id: int | None = None
    unk_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # jinja chat template (transformers' `chat_template`) the tokenizer came with, kept on
    # save; None: none (see tokenizers/chat_template.py)
    chat_template: str | None = None

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the model's embedding must hold."""

    @abstractmethod
    def encode_ids(self, text: str | bytes) -> list[int]:
        """Ids of one text (bytes are accepted where the tokenizer can represent them)."""

    @abstractmethod
    def decode(self, ids: Any) -> str:
        """Text of one id sequence; never raises on ids inside the vocab."""

    @abstractmethod
    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 byte count of each id's text (0 for special ids); shape (vocab_size,)."""

    @abstractmethod
    def _save_files(self, directory: Path) -> dict[str, Any]:
        """Write kind-specific files; return extra fields for tokenizer_config.json."""

    @classmethod
    @abstractmethod
    def _load_files(cls, directory: Path, config: dict[str, Any]) -> "Tokenizer":
        """Inverse of `_save_files`."""

    def _checked_ids(self, ids: Any) -> list[int]:
        """`as_id_list` plus a range check, so a wrong-vocab model fails with one clear line."""
        ids = as_id_list(ids)
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise SLMError(f"token id {bad} is outside this {self.kind} tokenizer's vocab "
                           f"(0..{self.vocab_size - 1}); use the tokenizer the model was trained with")
        return ids

    def normalize(self, text: str) -> str:
        """The text `decode(encode_ids(text))` returns; identity for lossless tokenizers."""
        return text

    def encode(self, texts: str | Sequence[str]) -> list[dict[str, np.ndarray]]:
        """The original reference API's batch form: `encode([text])[0]['input_ids']` is an int64 array."""
        if isinstance(texts, (str, bytes)):
            texts = [texts]
        return [{"input_ids": np.asarray(self.encode_ids(t), dtype=np.int64)} for t in texts]

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [self.encode_ids(t) for t in texts]

    def pad_batch(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, np.ndarray]:
        """A right-padded batch: `input_ids` and `attention_mask` (1 = real token), int64 (B, T).

        Pads with `pad_token_id`; a tokenizer without one (Llama's has none: BPE loading
        sets pad = eos) pads with eos, else id 0: ids under a 0 mask never reach a real
        token. `max_length` cuts longer texts on the right.
        """
        rows = self.encode_batch(list(texts))
        if max_length is not None:
            rows = [r[:max_length] for r in rows]
        if not rows:
            raise SLMError("pad_batch got no texts; pass at least one")
        width = max(len(r) for r in rows)
        pad = next((i for i in (self.pad_token_id, self.eos_token_id) if i is not None), 0)
        ids = np.full((len(rows), width), pad, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def special_ids(self) -> dict[str, int]:
        names = ("pad_token_id", "unk_token_id", "bos_token_id", "eos_token_id")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        extra = self._save_files(directory)
        config = {"kind": self.kind, "vocab_size": self.vocab_size, **self.special_ids(), **extra}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (directory / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    def spec(self) -> dict[str, Any]:
        """A small JSON-able description used in config hashes and meta files."""
        return {"kind": self.kind, "vocab_size": self.vocab_size, **self.special_ids()}
