"""Metrics (loss, perplexity, bits per byte, accuracy, UTF-8 validity) and the evaluator."""

from simplified_slm.evaluation.metrics import bits_per_byte, evaluate_lm, utf8_validity

__all__ = ["bits_per_byte", "evaluate_lm", "utf8_validity"]
