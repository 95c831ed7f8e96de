"""What generate() returns per request."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    index: int                     # position in the generate() call
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)   # emitted tokens only
    text: str = ""
    finish_reason: str | None = None                      # "stop" | "length" | "abort" | "error"
    sources: list[int] = field(default_factory=list)     # per token: 0 SLM, 1 LLM
    entropies: list[float] = field(default_factory=list)  # normalised entropy each token was drawn from
    stats: dict = field(default_factory=dict)
    error: str | None = None
    trace: list[tuple[int, int, int]] = field(default_factory=list)  # (model, new tokens, cached tokens) per forward
    routed: list[int] = field(default_factory=list)  # output indices the R-Stitch+ router decided (scheduler)
    request_id: str | int | None = None
    # time.monotonic() stamps, as vLLM's RequestMetrics: arrival_time, first_scheduled_time (admitted to a
    # sequence slot), first_token_time, finished_time
    metrics: dict = field(default_factory=dict)
