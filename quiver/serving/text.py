"""Turning a stream of generated tokens into a stream of text, with stop strings.

Tokens are decoded a few at a time: the text of the tokens since the last emitted offset,
minus the text those tokens had before the new one (so the cost per token stays constant and a
tokenizer that merges spaces or bytes across tokens is decoded in context). A character whose
UTF-8 bytes are split over tokens decodes to U+FFFD until its last byte arrives, so text that
ends in one is held back. Text that could be the beginning of a stop string is held back too,
until it is clear it is not; a stop string ends the completion and is not part of it (as in
OpenAI's API).
"""

from __future__ import annotations


class TextStream:
    """The text of one completion, a delta per token."""

    def __init__(self, tokenizer, stops: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in (stops or []) if s]
        self.tokens: list[int] = []
        self.text = ""  # decoded so far (stop strings cut)
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False  # a stop string was found
        self._prefix = 0  # tokens[_prefix:_read] were decoded last time
        self._read = 0

    def add(self, token: int) -> str:
        """The new text that is safe to send after `token` ("" when it must wait, and
        after a stop string)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        before = self._decode(self.tokens[self._prefix:self._read])
        after = self._decode(self.tokens[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # nothing new yet, or an unfinished character
        self.text += after[len(before):]
        self._prefix, self._read = self._read, len(self.tokens)
        return self._release()

    def flush(self) -> str:
        """The text held back, at the end of the completion."""
        if self.stopped:
            return ""
        rest = self._decode(self.tokens[self._prefix:])
        before = self._decode(self.tokens[self._prefix:self._read])
        if len(rest) > len(before):
            self.text += rest[len(before):].rstrip("\ufffd")
        self._release()
        delta = self.text[self.sent:]
        self.sent = len(self.text)
        return delta

    def _release(self) -> str:
        for stop in self.stops:  # the earliest stop string ends the text
            at = self.text.find(stop, max(0, self.sent - len(stop)))
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        safe = len(self.text) if self.stopped else len(self.text) - self._held()
        delta = self.text[self.sent:safe]
        self.sent = max(self.sent, safe)
        return delta

    def _held(self) -> int:
        """How many trailing characters could start a stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)
