"""Seed-000 import path: `from simplified_slm.utils import ByteTokenizer` keeps working."""

from simplified_slm.tokenizers.byte import ByteTokenizer

__all__ = ["ByteTokenizer"]
