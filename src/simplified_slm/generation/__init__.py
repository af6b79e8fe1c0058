"""Decoding: sampling rules and the cached generation loop."""

from simplified_slm.generation.generate import generate
from simplified_slm.generation.sampling import choose_next

__all__ = ["generate", "choose_next"]
