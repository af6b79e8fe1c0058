"""From token ids to the text a client sees: incremental decoding and stop sequences.

A streamed reply must never show half a UTF-8 character or the start of a stop sequence
that later completes, so `TextStream` holds such tails back until they resolve. Chat
prompts are rendered by `tokenizers.chat_template.ChatTemplate` (shared with SFT data
and `slm chat`).
"""

from __future__ import annotations

from typing import Callable, Sequence


class TextStream:
    """Decodes one choice's growing token list into text deltas, honouring stop strings."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str]) -> None:
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already handed out
        self.text = ""

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (new text safe to show, whether a stop sequence was hit)."""
        self.ids.append(token)
        self.text = self.decode(self.ids)
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return self._take(len(self.text)), True
        end = len(self.text)
        if self.text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            end -= 1
        end -= max((n for s in self.stop for n in range(1, len(s)) if self.text[:end].endswith(s[:n])), default=0)
        return self._take(end), False

    def flush(self) -> str:
        """The held-back tail, when the choice ends for another reason than a stop string."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        delta = self.text[self.sent:max(end, self.sent)]
        self.sent = max(end, self.sent)
        return delta
