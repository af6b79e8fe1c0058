"""Tokenizer identity: what decides which ids a text becomes, as a dict and as one digest.

A model's ids mean text only through the tokenizer it was trained with, and tokenizers of
the same kind and size can still map text to other ids. So a model folder records the
digest of its tokenizer (`TOKENIZER_RECORD`, written by `record_tokenizer`), and loading
refuses tokenizer files swapped for another vocabulary (`check_tokenizer_record`) instead
of giving silently wrong numbers; distillation compares a teacher's identity with the
student's through the same `tokenizer_identity`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from simplified_slm.errors import SLMError
from simplified_slm.tokenizers.base import Tokenizer
from simplified_slm.tokenizers.bpe import BPETokenizer
from simplified_slm.tokenizers.char import CharTokenizer
from simplified_slm.tokenizers.slm import SLMTokenizer
from simplified_slm.utils.io import atomic_write_json

TOKENIZER_RECORD = "tokenizer_identity.json"
RECORD_FORMAT = "simplified_slm.tokenizer_identity/1"
# parts of a tokenizer.json that decide which ids a text becomes (decoder/post-processor do not)
_BPE_ID_SECTIONS = ("model", "added_tokens", "normalizer", "pre_tokenizer")


def _merges_as_pairs(model: dict[str, Any]) -> dict[str, Any]:
    """tokenizers < 0.20 wrote merges as "a b", later versions as ["a", "b"]: compare them alike."""
    merges = model.get("merges")
    if not isinstance(merges, list):
        return model
    return {**model, "merges": [m.split(" ", 1) if isinstance(m, str) else list(m) for m in merges]}


def tokenizer_identity(tokenizer: Tokenizer | SLMTokenizer) -> dict[str, Any]:
    """What decides the text behind every id: equal identities mean the same ids for the same text."""
    if isinstance(tokenizer, SLMTokenizer):
        tokenizer = tokenizer.tokenizer
    identity: dict[str, Any] = {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size}
    if isinstance(tokenizer, BPETokenizer):
        # re-serialised by the installed `tokenizers`, so files written by different tools compare equal
        spec = json.loads(tokenizer.hf.to_str())
        identity.update({name: spec.get(name) for name in _BPE_ID_SECTIONS})
        if isinstance(identity["model"], dict):
            identity["model"] = _merges_as_pairs(identity["model"])
    elif isinstance(tokenizer, CharTokenizer):
        identity.update(chars=list(tokenizer.chars), policy=tokenizer.policy)
    return identity


def tokenizer_digest(tokenizer: Tokenizer | SLMTokenizer) -> str:
    """SHA-256 of `tokenizer_identity` (canonical JSON)."""
    text = json.dumps(tokenizer_identity(tokenizer), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def record_tokenizer(directory: str | Path, tokenizer: Any) -> None:
    """Write the tokenizer's identity into a model folder; objects that are not one of our
    tokenizers (or an SLMTokenizer around one) leave no record, as folders from before it."""
    if not isinstance(tokenizer, (Tokenizer, SLMTokenizer)):
        return
    atomic_write_json(Path(directory) / TOKENIZER_RECORD, {
        "format": RECORD_FORMAT, "kind": tokenizer_identity(tokenizer)["kind"],
        "vocab_size": tokenizer.vocab_size, "sha256": tokenizer_digest(tokenizer)})


def check_tokenizer_record(directory: str | Path, tokenizer: Tokenizer) -> None:
    """Refuse a tokenizer that is not the one the model folder was saved with (no record: accept)."""
    path = Path(directory) / TOKENIZER_RECORD
    if not path.is_file():
        return
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        recorded = (record["kind"], record["vocab_size"], record["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SLMError(f"{path} is unreadable ({type(err).__name__}); the model folder is damaged, "
                       "save the model again with save_pretrained(dir, tokenizer=...)") from None
    found = (tokenizer.kind, tokenizer.vocab_size, tokenizer_digest(tokenizer))
    if found != recorded:
        raise SLMError(f"the tokenizer files in {directory} are not the model's tokenizer (saved with "
                       f"{recorded[0]}, {recorded[1]} ids, sha256 {str(recorded[2])[:12]}; found {found[0]}, "
                       f"{found[1]} ids, sha256 {found[2][:12]}); put the model's own tokenizer files back")
