"""Incremental outputs of a running request: what one step added (token ids, sources, entropies, a text
delta), and the text stream that produces the deltas.

Who detokenizes: the engine, in the step, for requests with stop strings (their stop must be known before
the next step is planned) and for its own callers (`generate`, `add_requests`); the asyncio front
(AsyncEngine's RequestStream) for the others, on the event loop, while the step thread runs the next step,
as vLLM's front process does.

Text is streamed as vLLM streams it when stop strings are set: the last `max(len(stop)) - 1` characters
are held back until the next tokens show that no stop string starts there, and the text ends where the
first stop string begins. So the deltas of a request, joined, are exactly its final `text`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from .detokenize import IncrementalDecoder
from .outputs import RequestOutput


@dataclass
class StreamOutput:
    """What one commit added to a request; the last one has `finished` and the complete `output`."""
    request_id: str | int
    token_ids: list[int] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    text: str = ""                            # text delta ("" without a tokenizer or without text streaming)
    time: float = 0.0                         # time.monotonic() when these tokens were committed
    output: RequestOutput | None = None       # set on the last one

    @property
    def finished(self) -> bool:
        return self.output is not None

    @property
    def finish_reason(self) -> str | None:
        return self.output.finish_reason if self.output is not None else None


class TextStream:
    """The text of one request as its tokens arrive: `push` returns the delta that is safe to emit and
    whether a stop string was reached; `finish` returns the rest of the final text."""

    def __init__(self, tokenizer, stops: tuple[str, ...], skip_special_tokens: bool = True, lock=None):
        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens)
        self.lock = lock or contextlib.nullcontext()  # the tokenizer's, where other threads decode too
        self.stops = stops
        self.hold = max(map(len, stops), default=1) - 1
        self.sent = 0  # characters of decoder.text emitted
        self.stopped = False

    def push(self, token_ids: list[int]) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        tail = len(self.decoder.text)
        with self.lock:
            self.decoder.push(token_ids)
        text = self.decoder.text
        end = len(text) - self.hold
        if self.stops:
            start = max(0, tail - self.hold)  # a stop string may straddle the previous end
            cuts = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
            if cuts:
                end, self.stopped = min(cuts), True
        end = max(end, self.sent)
        delta, self.sent = text[self.sent:end], end
        return delta, self.stopped

    def finish(self, final_text: str) -> str:
        """The characters of the final text (cut at the stop) not emitted yet."""
        return final_text[self.sent:]


def text_in_step(params, detokenize: bool) -> bool:
    """Whether the engine makes a request's text in the step: when its caller does not make it (`detokenize`),
    and always with stop strings, whose stop must be known before the next step is planned."""
    return detokenize or bool(params.stop_strings)


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(cuts)] if cuts else text
