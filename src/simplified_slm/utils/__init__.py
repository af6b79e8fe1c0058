"""Small shared helpers (atomic file writes) and the seed-000 `ByteTokenizer` import path."""

from simplified_slm.utils.tokenizers import ByteTokenizer

__all__ = ["ByteTokenizer"]
