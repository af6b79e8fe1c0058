"""The tokenizer of a transformers export, in the form `AutoTokenizer.from_pretrained` loads.

transformers reads `tokenizer.json` plus a `tokenizer_config.json` of its own shape (class,
special-token strings, model_max_length). Ours has the same file name but another job (the
tokenizer kind and ids for `load_tokenizer`), so in an export folder ours moves to
`slm_tokenizer_config.json`, which `load_tokenizer` prefers, and tokenizer_config.json is
transformers'. Byte tokenizers become an equivalent byte-level `tokenizers` model (ids =
byte values, no merges); BPE tokenizers already are one. Char tokenizers have no exact
`tokenizers` equivalent (their ASCII folding is per character and conditional), so their
folder stays ours only: `load_tokenizer` reads it, AutoTokenizer does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from simplified_slm.tokenizers.base import SLM_TOKENIZER_CONFIG, TOKENIZER_CONFIG, Tokenizer
from simplified_slm.tokenizers.bpe import ROLES, TOKENIZER_FILE, BPETokenizer
from simplified_slm.tokenizers.byte import ByteTokenizer
from simplified_slm.utils.io import atomic_write, atomic_write_json


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what ByteLevel maps bytes to)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_level_tokenizer() -> HFTokenizer:
    """A `tokenizers` model equal to ByteTokenizer: every byte its own id, lossless."""
    vocab = {char: b for b, char in _byte_to_unicode().items()}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    return hf


def _as_hf(tokenizer: Tokenizer) -> HFTokenizer | None:
    if isinstance(tokenizer, BPETokenizer):
        return tokenizer.hf
    if isinstance(tokenizer, ByteTokenizer):
        return byte_level_tokenizer()
    return None


def transformers_can_load(tokenizer: Tokenizer) -> bool:
    """Whether `save_hf_tokenizer` can write `tokenizer` in a form AutoTokenizer loads."""
    return _as_hf(tokenizer) is not None


def save_hf_tokenizer(tokenizer: Tokenizer, directory: str | Path, model_max_length: int | None) -> bool:
    """Save `tokenizer` into a transformers export folder; True when AutoTokenizer can load it.

    `model_max_length` is the model's context (None: no limit); padding is on the right,
    as our models expect, and decoding does not "clean up" spaces, so transformers' text
    equals ours.
    """
    directory = Path(directory)
    tokenizer.save(directory)
    hf = _as_hf(tokenizer)
    if hf is None:
        return False
    (directory / TOKENIZER_CONFIG).replace(directory / SLM_TOKENIZER_CONFIG)
    if not (directory / TOKENIZER_FILE).is_file():
        atomic_write(directory / TOKENIZER_FILE, lambda tmp: hf.save(str(tmp)))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "padding_side": "right",
                              "clean_up_tokenization_spaces": False}
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    for role in ROLES:
        token_id = getattr(tokenizer, f"{role}_token_id")
        if token_id is not None:
            config[f"{role}_token"] = hf.id_to_token(token_id)
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    atomic_write_json(directory / TOKENIZER_CONFIG, config)
    return True

