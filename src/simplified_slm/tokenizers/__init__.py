"""Tokenizers: byte (default, lossless), char (ASCII or corpus vocab) and BPE (HF tokenizers)."""

from simplified_slm.tokenizers.base import Tokenizer
from simplified_slm.tokenizers.bpe import BPETokenizer
from simplified_slm.tokenizers.byte import ByteTokenizer
from simplified_slm.tokenizers.char import CharTokenizer
from simplified_slm.tokenizers.factory import TokenizerConfig, build_tokenizer, load_tokenizer
from simplified_slm.tokenizers.identity import tokenizer_digest, tokenizer_identity
from simplified_slm.tokenizers.slm import SLMTokenizer

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "CharTokenizer",
    "SLMTokenizer",
    "Tokenizer",
    "TokenizerConfig",
    "build_tokenizer",
    "load_tokenizer",
    "tokenizer_digest",
    "tokenizer_identity",
]
