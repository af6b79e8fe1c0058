"""Character-level tokenizer with a fixed ASCII vocab or one built from a corpus.

Character models are the smallest useful baseline (tiny shakespeare's 65 characters), but
a tiny vocab cannot cover all of Unicode. Two policies decide what happens to the rest:

* "ascii" (the char ASCII policy of the experimental-SLM spec): ids are `<PAD>`=0, `<UNK>`=1, printable ASCII 32..126,
  "\\n", "\\t" (99 ids). Text first goes through `normalize_ascii`, which folds curly quotes,
  dashes, ellipses, odd spaces, accents and line endings to ASCII, so typographic text
  loses nothing a reader would miss.
* "corpus": the vocab is the sorted set of characters seen in the training texts and no
  folding is applied, so the corpus itself is represented exactly.

Any character still outside the vocab becomes `<UNK>`, which decodes to nothing (as `<PAD>`
does): a sample a model writes then reads as text, without U+FFFD marks that look like
broken UTF-8 and without a "?" that could be mistaken for a real one. BPB still charges
`<UNK>` one byte (`token_byte_lengths`), so dropping it from decoded text changes no metric.
"""

from __future__ import annotations

import functools
import json
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence, get_args

import numpy as np

from simplified_slm.errors import SLMError
from simplified_slm.tokenizers.base import Tokenizer, as_text
from simplified_slm.utils.io import atomic_write_json

PAD_TOKEN = "<PAD>"
UNK_TOKEN = "<UNK>"
UNK_TEXT = ""  # what `<UNK>` decodes to (see the module docstring)
VOCAB_FILE = "vocab.json"
ASCII_CHARS: tuple[str, ...] = (*(chr(i) for i in range(32, 127)), "\n", "\t")
CharPolicy = Literal["ascii", "corpus"]
CHAR_POLICIES: tuple[str, ...] = get_args(CharPolicy)

# Punctuation NFKD leaves alone (or folds badly); everything else NFKD turns into ASCII.
_ASCII_PUNCTUATION = {
    **dict.fromkeys("\u2018\u2019\u201a\u201b\u2032\u2039\u203a\u00b4", "'"),
    **dict.fromkeys("\u201c\u201d\u201e\u201f\u2033\u00ab\u00bb", '"'),
    **dict.fromkeys("\u2010\u2011\u2012\u2013\u2212", "-"),
    **dict.fromkeys("\u2014\u2015", "--"),
    **dict.fromkeys("\u2022\u2023\u2043", "*"),
    **dict.fromkeys("\u2028\u2029\u0085", "\n"),
    # Invisible characters (zero-width spaces/joiners, BOM, soft hyphen) carry no text.
    **dict.fromkeys("\u200b\u200c\u200d\u2060\ufeff\u00ad", ""),
}


@functools.lru_cache(maxsize=4096)
def _fold_char(char: str) -> str:
    """ASCII spelling of one non-ASCII character, or the character itself if it has none."""
    if char in _ASCII_PUNCTUATION:
        return _ASCII_PUNCTUATION[char]
    folded = "".join(c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c))
    if not folded or not all(" " <= c <= "~" for c in folded):
        return char
    # Spacing accents ("´", "¨") decompose to a space plus a mark; they are not spaces.
    if folded.isspace() and unicodedata.category(char) != "Zs":
        return char
    return folded


def normalize_ascii(text: str) -> str:
    """Fold typographic Unicode to the ASCII a reader would type; idempotent.

    Curly quotes -> straight quotes, en dash -> "-", em dash -> "--", ellipsis -> "...",
    non-breaking and other spaces -> " ", accented letters -> their base letter,
    "\\r\\n" and "\\r" -> "\\n". Characters with no ASCII spelling are left for `<UNK>`.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.isascii():
        return text
    return "".join(c if c.isascii() else _fold_char(c) for c in text)


class CharTokenizer(Tokenizer):
    """One id per character; see the module docstring for the two vocab policies."""

    kind = "char"
    pad_token_id = 0
    unk_token_id = 1

    def __init__(self, chars: Sequence[str] = ASCII_CHARS, policy: CharPolicy = "ascii") -> None:
        if policy not in CHAR_POLICIES:
            raise SLMError(f"char tokenizer policy {policy!r} is unknown; choose one of {list(CHAR_POLICIES)}")
        bad = next((c for c in chars if not isinstance(c, str) or len(c) != 1), None)
        if bad is not None:
            raise SLMError(f"char vocab entry {bad!r} is not a single character; rebuild the vocab")
        if len(set(chars)) != len(chars):
            raise SLMError("char vocab lists a character twice; rebuild the vocab")
        self.chars: tuple[str, ...] = tuple(chars)
        self.policy: CharPolicy = policy
        self._ids = {c: i for i, c in enumerate(self.chars, start=2)}
        self._pieces = ("", UNK_TEXT, *self.chars)

    @classmethod
    def from_corpus(cls, texts: Iterable[str]) -> "CharTokenizer":
        """Vocab = every character seen, sorted, so the same corpus always gives the same ids."""
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls(sorted(seen), policy="corpus")

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def _fold(self, text: str | bytes) -> str:
        text = as_text(text)
        return normalize_ascii(text) if self.policy == "ascii" else text

    def encode_ids(self, text: str | bytes) -> list[int]:
        unk = self.unk_token_id
        return [self._ids.get(c, unk) for c in self._fold(text)]

    def decode(self, ids: Any) -> str:
        return "".join(self._pieces[i] for i in self._checked_ids(ids))

    def normalize(self, text: str) -> str:
        """Folded text without the out-of-vocab characters, as `decode` gives it."""
        return "".join(c if c in self._ids else UNK_TEXT for c in self._fold(text))

    def token_byte_lengths(self) -> np.ndarray:
        """`<UNK>` stands for one original character of unknown width: counted as 1 byte."""
        return np.array([0, 1, *(len(c.encode("utf-8")) for c in self.chars)], dtype=np.int64)

    def _save_files(self, directory: Path) -> dict[str, Any]:
        atomic_write_json(directory / VOCAB_FILE, [PAD_TOKEN, UNK_TOKEN, *self.chars])
        return {"char_policy": self.policy}

    @classmethod
    def _load_files(cls, directory: Path, config: dict[str, Any]) -> "CharTokenizer":
        path = directory / VOCAB_FILE
        try:
            vocab = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SLMError(f"char vocab file {path} is missing; save the tokenizer again") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SLMError(f"cannot read char vocab file {path}: {err}; save the tokenizer again") from None
        if not isinstance(vocab, list) or vocab[:2] != [PAD_TOKEN, UNK_TOKEN]:
            raise SLMError(f"{path} must be a JSON list starting with {PAD_TOKEN!r}, {UNK_TOKEN!r}; "
                           "save the tokenizer again")
        return cls(vocab[2:], policy=config.get("char_policy", "corpus"))
