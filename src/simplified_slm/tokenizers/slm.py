"""`SLMTokenizer`: the Llama 3.2 SLM recipe's tokenizer API over whichever tokenizer a folder holds.

That recipe loads a tokenizer with `SLMTokenizer.from_pretrained(dir)`, encodes a prompt to a
plain list of ids and decodes generated ids back (`decode(output[0])`). Our tokenizers
keep the original reference API's batch `encode` (a list of dicts), so this is a thin adapter around any of
them rather than another tokenizer: the ids are exactly those of the wrapped tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from simplified_slm.tokenizers.base import Tokenizer, as_id_list
from simplified_slm.tokenizers.factory import load_tokenizer


class SLMTokenizer:
    """Text <-> list of ids, with the special ids and vocab size a model needs."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "SLMTokenizer":
        """Load a saved tokenizer folder, a checkpoint or run folder, an HF folder or a tokenizer.json."""
        return cls(load_tokenizer(path))

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the folder `from_pretrained` (and transformers' AutoTokenizer, for BPE) reads."""
        self.tokenizer.save(directory)

    # `model.save_pretrained(dir, tokenizer=...)` calls `.save`
    save = save_pretrained

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of `text`; `add_special_tokens` prepends BOS when the tokenizer has one (Llama style)."""
        ids = self.tokenizer.encode_ids(text)
        bos = self.tokenizer.bos_token_id
        return [bos, *ids] if add_special_tokens and bos is not None else ids

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Text of one sequence (list, array or tensor); optionally without pad/bos/eos/unk ids."""
        if skip_special_tokens:
            special = set(self.tokenizer.special_ids().values())
            ids = [i for i in as_id_list(ids) if i not in special]
        return self.tokenizer.decode(ids)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def __len__(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def pad_token_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    @property
    def padding_side(self) -> str:
        return self.tokenizer.padding_side

    def pad_batch(self, texts: list[str], max_length: int | None = None) -> dict[str, Any]:
        """Right-padded `input_ids` + `attention_mask` arrays (see `Tokenizer.pad_batch`)."""
        return self.tokenizer.pad_batch(texts, max_length)

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def unk_token_id(self) -> int | None:
        return self.tokenizer.unk_token_id
