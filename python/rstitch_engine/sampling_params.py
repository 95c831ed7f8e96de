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

from dataclasses import dataclass, field

from . import checks
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
    # True: neither reuse cached prefix KV nor offer this request's own, so its forwards (trace, timings)
    # are those of the request alone: rewards and measurements that must not depend on what ran before
    skip_prefix_cache: bool = False
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Checks every field (run when built, and again by generate: the fields may have been changed);
        raises checks.InvalidValue naming the field."""
        checks.integer("max_tokens", self.max_tokens, 1)
        checks.number("temperature", self.temperature, 0, high_open=True)
        checks.number("top_p", self.top_p, 0, 1, low_open=True)
        self.top_k = max(checks.integer("top_k", self.top_k, -1), 0)  # -1: off, as 0
        if self.seed is not None:
            checks.integer("seed", self.seed, 0, SEED_MAX)
        checks.integer("min_tokens", self.min_tokens, 0, self.max_tokens)
        stops = [self.stop] if isinstance(self.stop, str) else self.stop if self.stop is not None else []
        if not isinstance(stops, (list, tuple)) or any(not isinstance(s, str) or not s for s in stops):
            raise checks.InvalidValue("stop", "a non-empty string or a list of them", self.stop)
        self.stop_strings = tuple(stops)
        for name in ("ignore_eos", "skip_special_tokens", "skip_prefix_cache"):
            checks.flag(name, getattr(self, name))
        if self.stop_token_ids is not None:
            checks.token_ids("stop_token_ids", self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        """Whether this request decodes greedily (temperature below GREEDY_TEMPERATURE)."""
        return self.temperature < GREEDY_TEMPERATURE
