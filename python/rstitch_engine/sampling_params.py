"""Per-request sampling parameters (vLLM-compatible names and defaults), validated when built."""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0       # 0: greedy
    top_p: float = 1.0
    top_k: int = 0                 # 0 or -1: off
    seed: int | None = None        # same seed, same output, whatever else is in the batch
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self):
        def fail(msg: str):
            raise ValueError(f"SamplingParams: {msg}")

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            fail(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            fail(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            fail(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            fail(f"top_k must be an integer >= 0 (or -1 for off), got {self.top_k!r}")
        self.top_k = max(self.top_k, 0)
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            fail(f"seed must be an integer or None, got {self.seed!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            fail(f"min_tokens must be in [0, max_tokens], got {self.min_tokens!r}")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            fail(f"stop must be non-empty strings, got {self.stop!r}")
        self.stop_strings = tuple(stops)
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids or []):
            fail(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
