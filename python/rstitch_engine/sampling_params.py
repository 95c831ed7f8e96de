"""Per-request sampling parameters (vLLM-compatible names and defaults), validated when built.

Every integer goes to the C++ scheduler as a 32-bit int, so each is checked against that range here, with
a message naming the field, instead of failing later in the bindings.

Temperatures below `GREEDY_TEMPERATURE` (1e-5) decode greedily: logits / T would overflow float32 for the
tiny ones (1e-39 is a denormal; its inverse is inf), and at 1e-5 sampling is already the argmax up to ties.
The engine sends such requests to the scheduler as temperature 0, and the kernels (stitch step, its
reference, the sampling cutoff, speculative verification) apply the same threshold.

Seeds: any integer in [0, 2**63 - 1]. The scheduler's random streams take 31 bits; seeds below 2**31 are
used as they are, larger ones are hashed into 31 bits (`scheduler_seed`), so seed s and seed s + 2**31 are
different streams (they used to be folded together modulo 2**31).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .protocol import INT32_MAX

GREEDY_TEMPERATURE = 1e-5  # temperature < this: greedy
SEED_MAX = 2**63 - 1


def scheduler_seed(seed: int) -> int:
    """The scheduler's 31-bit stream key of a user seed in [0, 2**63): itself below 2**31, else a
    splitmix64 hash of it folded to 31 bits."""
    if seed <= INT32_MAX:
        return seed
    z = (seed + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return (z ^ (z >> 31)) & INT32_MAX


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0       # 0 (or below GREEDY_TEMPERATURE): greedy
    top_p: float = 1.0
    top_k: int = 0                 # 0 or -1: off
    seed: int | None = None        # same seed, same output, whatever else is in the batch; [0, 2**63)
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Checks every field (run when built, and again by generate: the fields may have been changed)."""
        def fail(msg: str):
            raise ValueError(f"SamplingParams: {msg}")

        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= INT32_MAX:
            fail(f"max_tokens must be an integer in [1, 2**31 - 1], got {self.max_tokens!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            fail(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            fail(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or not -1 <= self.top_k <= INT32_MAX:
            fail(f"top_k must be an integer in [0, 2**31 - 1] (or -1 for off), got {self.top_k!r}")
        self.top_k = max(self.top_k, 0)
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= SEED_MAX):
            fail(f"seed must be an integer in [0, 2**63 - 1] or None, got {self.seed!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            fail(f"min_tokens must be an integer in [0, max_tokens], got {self.min_tokens!r}")
        if self.stop is None or isinstance(self.stop, str):
            stops = [] if self.stop is None else [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            stops = list(self.stop)
        else:
            fail(f"stop must be a string or a list of strings, got {type(self.stop).__name__}")
        if any(not isinstance(s, str) or not s for s in stops):
            fail(f"stop must be non-empty strings, got {self.stop!r}")
        self.stop_strings = tuple(stops)
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                fail(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, (list, tuple)):
            fail(f"stop_token_ids must be a list of token ids, got {type(self.stop_token_ids).__name__}")
        if any(not _is_int(t) or not 0 <= t <= INT32_MAX for t in self.stop_token_ids or []):
            fail(f"stop_token_ids must be integers in [0, 2**31 - 1], got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        """Whether this request decodes greedily (temperature below GREEDY_TEMPERATURE)."""
        return self.temperature < GREEDY_TEMPERATURE
