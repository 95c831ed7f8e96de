"""Decoding policies: parameters of the scheduler's one state machine, not separate loops.

SLM-only is "never switch", LLM-only "start on the LLM and never hand back", R-Stitch the entropy rule
(docs/method.md, 'The R-Stitch rule' and 'Hand-back rule'), Forced a fixed routing pattern for benchmarks
('Forced routing'), SpecDecode a draft/verify cycle ('Speculative decoding (baseline)').
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import checks
from .protocol import INT32_MAX, LLM, SLM

INF = math.inf


class Policy:
    name = "policy"
    models: frozenset = frozenset({SLM, LLM})

    def configure(self, spec, max_tokens: int) -> None:
        """Writes this policy into a native RequestSpec."""
        raise NotImplementedError


@dataclass(frozen=True)
class SLMOnly(Policy):
    models = frozenset({SLM})

    @property
    def name(self):
        return "slm"

    def configure(self, spec, max_tokens):
        spec.start_model, spec.tau_up = SLM, INF


@dataclass(frozen=True)
class LLMOnly(Policy):
    models = frozenset({LLM})

    @property
    def name(self):
        return "llm"

    def configure(self, spec, max_tokens):
        spec.start_model, spec.tau_down = LLM, -INF


@dataclass(frozen=True)
class RStitch(Policy):
    """The SLM decodes; H > tau discards its token and the LLM produces that position, keeping control
    until its own H <= tau_down (default: tau). `handover_after=n` makes the LLM hand back after exactly n
    tokens instead (R2R-style). Options that cut switches (docs/method.md, 'Cutting switches'; neither is the
    paper's rule): tau_down < tau (hysteresis), `min_llm_run=n` (the LLM keeps at least n tokens)."""
    tau: float = 0.02
    tau_down: float | None = None
    handover_after: int | None = None
    min_llm_run: int | None = None

    def __post_init__(self):
        checks.number("tau", self.tau)
        if self.tau_down is not None:
            checks.number("tau_down", self.tau_down)
        if self.handover_after is not None:
            checks.integer("handover_after", self.handover_after, 1)
        if self.min_llm_run is not None:
            checks.integer("min_llm_run", self.min_llm_run, 1)
        if self.min_llm_run is not None and self.handover_after is not None:
            raise ValueError("give handover_after or min_llm_run, not both")

    @property
    def name(self):
        down = f":down{self.tau_down:g}" if self.tau_down is not None and self.tau_down != self.tau else ""
        return (f"rstitch:{self.tau:g}{down}" + (f":min{self.min_llm_run}" if self.min_llm_run else "")
                + (f"/h{self.handover_after}" if self.handover_after else ""))

    def configure(self, spec, max_tokens):
        spec.start_model = SLM
        spec.tau_up = float(self.tau)
        spec.tau_down = float(self.tau if self.tau_down is None else self.tau_down)
        spec.handover_after = self.handover_after or 0
        spec.min_llm_run = self.min_llm_run or 0


@dataclass(frozen=True)
class Forced(Policy):
    """Routing from a pattern instead of the entropy (which is still computed every step): `pattern` lists
    the output positions the LLM produces ("40-47,130-137" or an iterable of ints), or `llm_share` with
    `mean_run` and `seed` draws runs of LLM positions with that share and mean length."""
    pattern: str | tuple[int, ...] | None = None
    llm_share: float | None = None
    mean_run: float = 8.0
    seed: int = 0

    def __post_init__(self):
        if (self.pattern is None) == (self.llm_share is None):
            raise ValueError("Forced needs exactly one of pattern or llm_share")
        if self.llm_share is not None:
            checks.number("llm_share", self.llm_share, 0, 1)
        checks.number("mean_run", self.mean_run, 1, high_open=True)
        checks.integer("seed", self.seed, 0, 2**63 - 1)
        if isinstance(self.pattern, str):
            _pattern_ranges(self.pattern)  # a bad pattern fails here, not when a request is admitted
        elif self.pattern is not None:
            try:
                items = tuple(self.pattern)
            except TypeError:
                raise ValueError(f"Forced pattern must be a string like '40-47,130' or an iterable of output "
                                 f"positions, got {type(self.pattern).__name__}") from None
            object.__setattr__(self, "pattern", tuple(checks.integer(f"pattern[{i}]", p, -INT32_MAX - 1)
                                                      for i, p in enumerate(items)))

    @classmethod
    def periodic(cls, llm_share: float, run: int, length: int) -> "Forced":
        """round(llm_share * length) LLM positions in runs of about `run`, one at the end of each of
        equal segments of the output (so every run follows an SLM stretch, as in real switching)."""
        n = min(length, round(llm_share * length))
        if n <= 0:
            return cls(pattern=())
        runs = max(1, round(n / run))
        pattern = []
        for i in range(runs):
            size = n // runs + (i < n % runs)
            end = (i + 1) * length // runs
            pattern += range(end - size, end)
        return cls(pattern=tuple(pattern))

    @property
    def name(self):
        if self.llm_share is not None:
            return f"forced:{self.llm_share:g}:{self.mean_run:g}"
        return f"forced:pattern[{len(self.pattern) if not isinstance(self.pattern, str) else self.pattern}]"

    def llm_positions(self, length: int) -> np.ndarray:
        """uint8[length]: 1 where the LLM produces that output position."""
        mask = np.zeros(length, dtype=np.uint8)
        if isinstance(self.pattern, str):
            for a, b in _pattern_ranges(self.pattern):
                mask[max(a, 0):max(b + 1, 0)] = 1
        elif self.pattern is not None:
            idx = np.asarray([p for p in self.pattern if 0 <= p < length], dtype=np.int64)
            mask[idx] = 1
        elif self.llm_share > 0:
            rng = np.random.default_rng(self.seed)
            gap_mean = self.mean_run * (1 - self.llm_share) / self.llm_share
            pos = 0
            while pos < length:
                pos += int(rng.geometric(1 / (gap_mean + 1))) - 1 if gap_mean > 0 else 0
                run = int(rng.geometric(1 / self.mean_run))
                mask[pos:pos + run] = 1
                pos += run
        return mask

    def configure(self, spec, max_tokens):
        spec.start_model = SLM
        spec.forced = self.llm_positions(max_tokens).tolist()


def _pattern_ranges(pattern: str) -> list[tuple[int, int]]:
    """'40-47,130' -> [(40, 47), (130, 130)] (inclusive output positions)."""
    ranges = []
    for part in filter(None, (p.strip() for p in pattern.split(","))):
        lo, _, hi = part.partition("-")
        try:
            ranges.append((int(lo), int(hi or lo)))
        except ValueError:
            raise ValueError(f"bad forced pattern item {part!r}; use e.g. '40-47,130'") from None
    return ranges


@dataclass(frozen=True)
class SpecDecode(Policy):
    """Speculative decoding: the SLM drafts k tokens, the LLM verifies k + 1 in one extend; greedy keeps the
    longest agreeing prefix plus the LLM's token, sampling uses the rejection rule (output ~ the LLM's).
    `accept_rate` (benchmarks only) accepts each draft with that probability instead of verifying it."""
    k: int = 4
    accept_rate: float | None = None

    def __post_init__(self):
        checks.integer("k", self.k, 1)
        if self.accept_rate is not None:
            checks.number("accept_rate", self.accept_rate, 0, 1)

    @property
    def name(self):
        return f"spec:{self.k}" + (f"@{self.accept_rate:g}" if self.accept_rate is not None else "")

    def configure(self, spec, max_tokens):
        spec.start_model, spec.spec_k = SLM, self.k
        if self.accept_rate is not None:
            spec.accept_rate = float(self.accept_rate)


@dataclass(frozen=True)
class RStitchPlus(Policy):
    """R-Stitch+: where the SLM's entropy exceeds tau, a learned router (rstitch_engine.router) decides
    whether to keep the SLM token or switch to the LLM; the LLM hands back by the entropy rule.
    `router` is a router file (.safetensors) or a loaded Router; `temperature` > 0 samples its decisions
    (exploration during training), 0 takes the likelier one."""
    router: object = None
    tau: float = RStitch.tau  # one default threshold for both
    tau_down: float | None = None
    temperature: float = 0.0

    def __post_init__(self):
        if self.router is None:
            raise ValueError("RStitchPlus needs a router (a .safetensors file or a Router)")
        checks.number("tau", self.tau)
        if self.tau_down is not None:
            checks.number("tau_down", self.tau_down)
        checks.number("temperature", self.temperature, 0)

    @property
    def name(self):  # a router file names its row, so two routers compared side by side get two rows
        source = f"@{Path(self.router).stem}" if isinstance(self.router, (str, Path)) else ""
        return f"rstitch+:{self.tau:g}{source}"

    def configure(self, spec, max_tokens):
        spec.start_model, spec.use_router = SLM, True
        spec.tau_up = float(self.tau)
        spec.tau_down = float(self.tau if self.tau_down is None else self.tau_down)


def _parse_rstitch_plus(arg: str) -> RStitchPlus:
    """'0.02@router.safetensors': R-Stitch+ at tau 0.02 with that router file."""
    tau, at, router = arg.partition("@")
    if not at or not router:
        raise ValueError("R-Stitch+ needs a router file: rstitch+:<tau>@<router.safetensors>")
    if not Path(router).is_file():
        raise ValueError(f"router file {router!r} not found")
    return RStitchPlus(router=router, tau=float(tau) if tau else RStitchPlus.tau)


def _parse_rstitch(arg: str) -> RStitch:
    """'0.02', '0.02:down0.01', '0.02:min3', '0.02:down0.01:min3' (empty: tau 0.02)."""
    tau, *options = arg.split(":") if arg else [repr(RStitch.tau)]
    kw = {}
    for option in options:
        if option.startswith("down"):
            kw["tau_down"] = float(option[4:])
        elif option.startswith("min"):
            kw["min_llm_run"] = int(option[3:])
        else:
            raise ValueError(f"unknown R-Stitch option {option!r} (down<tau_down>, min<tokens>)")
    return RStitch(tau=float(tau), **kw)


def parse_policy(text: str) -> Policy:
    """'llm', 'slm', 'rstitch:0.02' (options ':down<tau_down>', ':min<LLM run>'), 'handover:0.02' (R-Stitch with
    handover_after=1), 'rstitch+:0.02@router.safetensors' (R-Stitch+ with that router), 'spec:4', and for
    benchmarks 'spec:4@0.7' (drafts accepted with probability 0.7) and 'forced:0.1:8' (10% LLM positions
    in runs of mean length 8)."""
    kind, _, arg = text.strip().partition(":")
    try:
        if kind == "spec" and "@" in arg:
            k, _, rate = arg.partition("@")
            return SpecDecode(k=int(k), accept_rate=float(rate))
        if kind == "forced":
            share, _, run = arg.partition(":")
            return Forced(llm_share=float(share), mean_run=float(run) if run else 8.0)
        if kind == "llm" and not arg:
            return LLMOnly()
        if kind == "slm" and not arg:
            return SLMOnly()
        if kind == "rstitch":
            return _parse_rstitch(arg)
        if kind == "rstitch+":
            return _parse_rstitch_plus(arg)
        if kind == "handover":
            return RStitch(tau=float(arg) if arg else RStitch.tau, handover_after=1)
        if kind == "spec":
            return SpecDecode(k=int(arg) if arg else 4)
    except ValueError as e:
        raise ValueError(f"bad policy {text!r}: {e}") from None
    raise ValueError(f"unknown policy {text!r}; use llm, slm, rstitch:<tau>[:down<tau>][:min<n>], handover:<tau>, "
                     f"rstitch+:<tau>@<router file>, spec:<k>, "
                     f"spec:<k>@<accept rate> or forced:<llm share>[:<mean run>]")


def parse_policies(text: str) -> list[Policy]:
    """'llm,slm,spec:4,rstitch:0.02' -> one policy each, in order; empty or repeated entries are errors."""
    names = [name.strip() for name in text.split(",")]
    if not text.strip() or "" in names:
        raise ValueError(f"policy list {text!r} has an empty entry; e.g. 'llm,slm,rstitch:0.02'")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"policy list {text!r} repeats {', '.join(repeated)}")
    return [parse_policy(name) for name in names]
