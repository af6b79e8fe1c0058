"""Subword tokenizers backed by HuggingFace `tokenizers`: trained here or loaded from disk.

Training always builds a GPT-2 style byte-level BPE (all 256 bytes in the initial
alphabet), so every string encodes and decodes exactly. Loading accepts any local
`tokenizer.json` (GPT-2, Llama-3, SmolLM2, or SentencePiece-converted Llama-2 files), finds
the special ids from the usual token names or a `tokenizer_config.json` next to it, and
falls back to pad = eos like TinyLM's Llama-2 recipe, since causal LMs rarely ship a pad.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from simplified_slm.configbase import read_config_file
from simplified_slm.errors import SLMError
from simplified_slm.tokenizers.base import TOKENIZER_CONFIG, Tokenizer, as_text
from simplified_slm.utils.io import atomic_write

TOKENIZER_FILE = "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
DEFAULT_SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, PAD_TOKEN)
ROLES = ("eos", "bos", "pad", "unk")

# Names each role goes by across tokenizer families; the first one present wins.
_ROLE_TOKEN_NAMES: dict[str, tuple[str, ...]] = {
    "eos": ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "<|eot_id|>"),
    "bos": ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>"),
    "pad": ("<|pad|>", "<pad>", "[PAD]", "<|padding|>"),
    "unk": ("<unk>", "<|unk|>", "[UNK]"),
}
_BYTE_FALLBACK_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# The printable stand-ins GPT-2 style byte-level vocabs use to spell the 256 raw bytes.
_BYTE_LEVEL_CHARS = frozenset(pre_tokenizers.ByteLevel.alphabet())


def min_bpe_vocab_size(special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS) -> int:
    """Smallest trainable vocab: every byte plus the special tokens, before any merge."""
    return 256 + len(set(special_tokens))


def _read_tokenizer_json(path: Path) -> HFTokenizer:
    if not path.is_file():
        raise SLMError(f"tokenizer file not found: {path}; pass a tokenizer.json or a saved tokenizer directory")
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as err:  # the Rust parser raises plain Exception subclasses
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise SLMError(f"cannot load tokenizer file {path}: {first}; pass a valid HF tokenizer.json") from None


def _json_types(node: Any) -> set[str]:
    """Every component "type" in a tokenizer.json subtree (decoders nest in Sequences)."""
    if isinstance(node, dict):
        found = {node["type"]} if isinstance(node.get("type"), str) else set()
        return found.union(*(_json_types(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_json_types(v) for v in node))
    return set()


def _config_token_name(value: Any) -> str | None:
    """HF configs store special tokens as a string or as {"content": ..., ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _token_byte_length(token: str, byte_level: bool) -> int:
    """Mirror of the decoders: ByteLevel maps stand-ins to bytes (a token with any other
    character is emitted as its own UTF-8); SentencePiece turns "<0xNN>" into one byte."""
    if byte_level:
        return len(token) if set(token) <= _BYTE_LEVEL_CHARS else len(token.encode("utf-8"))
    if _BYTE_FALLBACK_TOKEN.fullmatch(token):
        return 1
    return len(token.replace("▁", " ").encode("utf-8"))


class BPETokenizer(Tokenizer):
    """A wrapped `tokenizers.Tokenizer`; ids are exactly what HF tooling would produce."""

    kind = "bpe"

    def __init__(self, hf: HFTokenizer, *, eos_token_id: int | None = None, bos_token_id: int | None = None,
                 pad_token_id: int | None = None, unk_token_id: int | None = None) -> None:
        self.hf = hf
        vocab = hf.get_vocab(with_added_tokens=True)
        # Added tokens may sit past the model vocab or leave holes; the embedding needs max id + 1.
        self._vocab_size = max(vocab.values(), default=-1) + 1
        self._id_to_token = {i: t for t, i in vocab.items()}
        self.eos_token_id, self.bos_token_id = eos_token_id, bos_token_id
        self.pad_token_id = eos_token_id if pad_token_id is None else pad_token_id
        self.unk_token_id = unk_token_id
        for name, value in self.special_ids().items():
            if not 0 <= value < self._vocab_size:
                raise SLMError(f"{name} {value} is outside the tokenizer's vocab (0..{self._vocab_size - 1}); "
                               "fix tokenizer_config.json")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int,
              special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS) -> "BPETokenizer":
        """Byte-level BPE: no prefix space is added, so decode(encode(text)) == text exactly."""
        if vocab_size < min_bpe_vocab_size(special_tokens):
            raise SLMError(f"BPE vocab_size {vocab_size} is too small: it needs at least "
                           f"{min_bpe_vocab_size(special_tokens)} (256 bytes + {len(set(special_tokens))} "
                           "special tokens); raise vocab_size")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        # HF draws its own bars for counting and merging, on a terminal only (they are
        # carriage-return redraws); elsewhere the caller's line progress covers the reading
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=sys.stderr.isatty())
        hf.train_from_iterator(texts, trainer)
        return cls._with_detected_specials(hf, {})

    @classmethod
    def from_file(cls, path: str | Path) -> "BPETokenizer":
        """Load a tokenizer.json; a tokenizer_config.json beside it overrides the special ids."""
        path = Path(path)
        hf = _read_tokenizer_json(path)
        config_path = path.parent / TOKENIZER_CONFIG
        return cls._with_detected_specials(hf, read_config_file(config_path) if config_path.is_file() else {})

    @classmethod
    def _with_detected_specials(cls, hf: HFTokenizer, config: dict[str, Any]) -> "BPETokenizer":
        """Per role: HF's `<role>_token` name, else our `<role>_token_id`, else a known name."""
        ids: dict[str, int | None] = {}
        for role in ROLES:
            name = _config_token_name(config.get(f"{role}_token"))
            if name is not None:
                ids[role] = hf.token_to_id(name)
                if ids[role] is None:
                    raise SLMError(f"{TOKENIZER_CONFIG} names {role}_token {name!r}, which is not in the "
                                   "tokenizer.json vocab; fix or remove that field")
            elif isinstance(config.get(f"{role}_token_id"), int):
                ids[role] = config[f"{role}_token_id"]
            else:
                ids[role] = next((i for i in map(hf.token_to_id, _ROLE_TOKEN_NAMES[role]) if i is not None), None)
        return cls(hf, **{f"{role}_token_id": ids[role] for role in ROLES})

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode_ids(self, text: str | bytes) -> list[int]:
        """No BOS/EOS is added: documents are joined with eos by the data pipeline instead."""
        return self.hf.encode(as_text(text), add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """HF encodes a batch on all cores, which matters when tokenizing a whole corpus."""
        encodings = self.hf.encode_batch([as_text(t) for t in texts], add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Any) -> str:
        """Special tokens are kept, so decode(encode(text)) == text even if text contains them."""
        return self.hf.decode(self._checked_ids(ids), skip_special_tokens=False)

    def normalize(self, text: str) -> str:
        """Loaded tokenizers need not be lossless (SentencePiece <unk>, stripped spaces)."""
        return self.decode(self.encode_ids(text))

    def token_byte_lengths(self) -> np.ndarray:
        """Bytes each id adds to the decoded text, read from the token string.

        Byte-level vocabs spell each byte with one stand-in character; SentencePiece vocabs
        spell a space as "▁" and unknown bytes as "<0xNN>". The decoder's leading-space strip
        in SentencePiece files is ignored, so their count can exceed the text by 1 byte.
        """
        byte_level = "ByteLevel" in _json_types(json.loads(self.hf.to_str())["decoder"])
        special = {i for i, tok in self.hf.get_added_tokens_decoder().items() if tok.special}
        lengths = np.zeros(self._vocab_size, dtype=np.int64)
        for i, token in self._id_to_token.items():
            if i not in special:
                lengths[i] = _token_byte_length(token, byte_level)
        return lengths

    def _save_files(self, directory: Path) -> dict[str, Any]:
        """tokenizer.json plus HF's token-name fields, so `AutoTokenizer` can load the directory."""
        atomic_write(directory / TOKENIZER_FILE, lambda tmp: self.hf.save(str(tmp)))
        names = {f"{role}_token": self._id_to_token.get(getattr(self, f"{role}_token_id")) for role in ROLES}
        return {"tokenizer_class": "PreTrainedTokenizerFast", **{k: v for k, v in names.items() if v is not None}}

    @classmethod
    def _load_files(cls, directory: Path, config: dict[str, Any]) -> "BPETokenizer":
        hf = _read_tokenizer_json(directory / TOKENIZER_FILE)
        return cls(hf, **{f"{role}_token_id": config.get(f"{role}_token_id") for role in ROLES})
