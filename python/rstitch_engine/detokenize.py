"""Incremental detokenization: text deltas as tokens arrive, never splitting a multi-byte character."""
from __future__ import annotations


class IncrementalDecoder:
    """Decodes a window that starts a few tokens back, so merges across the boundary come out right, and
    holds back text that ends in a partial character (U+FFFD) until the next token completes it."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.text = ""

    def push(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=self.skip)  # noqa: E731
        before = decode(self.ids[self.prefix:self.read])
        now = decode(self.ids[self.prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        delta = now[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta
