"""Switching statistics of R-Stitch outputs: how often control moves between the models, how long each
model's runs are, and what the forwards of each kind cost (issue: a catch-up extend must cost what the decode
it replaces costs).

A forward's kind follows from its new tokens: a decode (1), a small extend (2..SMALL_EXTEND: a catch-up after
a switch, or a verify), a long extend (a prompt or a long catch-up).
"""
from __future__ import annotations

import statistics
from itertools import groupby

from .protocol import Model

SMALL_EXTEND = 16
KINDS = ("decode", "small_extend", "long_extend")


def forward_kind(new_tokens: int) -> str:
    return "decode" if new_tokens == 1 else "small_extend" if new_tokens <= SMALL_EXTEND else "long_extend"


def run_lengths(sources: list[int]) -> dict[int, list[int]]:
    """Per model, the lengths of its runs of consecutive output tokens."""
    runs: dict[int, list[int]] = {m: [] for m in Model}
    for model, run in groupby(sources):
        runs[Model(model)].append(sum(1 for _ in run))
    return runs


def _distribution(values: list[int]) -> dict:
    if not values:
        return {"runs": 0, "mean": None, "p50": None, "p90": None, "max": None}
    ordered = sorted(values)
    return {"runs": len(values), "mean": statistics.mean(values), "p50": ordered[len(ordered) // 2],
            "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], "max": ordered[-1]}


def switching_stats(outputs, steps=None) -> dict:
    """Over `outputs` (RequestOutputs): switches per 1k tokens, LLM and SLM run-length distributions, and per
    model and forward kind the number of forwards and the tokens they fed (from the traces). With `steps`
    (the StepTiming rows of the same generate calls, `Engine.step_timings`), also the mean ms per kind."""
    tokens = sum(len(o.token_ids) for o in outputs)
    switches = sum(o.stats.get("switches_to_llm", 0) + o.stats.get("switches_to_slm", 0) for o in outputs)
    runs = {m: [] for m in Model}
    for o in outputs:
        for m, lengths in run_lengths(o.sources).items():
            runs[m] += lengths
    per_kind: dict[str, dict] = {}
    for o in outputs:
        for model, new, _ in o.trace:
            entry = per_kind.setdefault(f"{Model(model).name.lower()}_{forward_kind(new)}", {"forwards": 0, "tokens": 0})
            entry["forwards"] += 1
            entry["tokens"] += new
    if steps is not None:
        times: dict[str, list[float]] = {}
        for t in steps:
            if t.logits:  # forwards that decide tokens; prefill chunks without logits are not switch costs
                times.setdefault(f"{Model(t.model).name.lower()}_{forward_kind(t.tokens // max(t.rows, 1))}",
                                 []).append(t.seconds * 1e3)
        for key, values in times.items():
            per_kind.setdefault(key, {"forwards": 0, "tokens": 0})["mean_ms"] = statistics.mean(values)
    return {"switches_per_1k": 1000 * switches / tokens if tokens else 0.0,
            "llm_runs": _distribution(runs[Model.LLM]), "slm_runs": _distribution(runs[Model.SLM]),
            "forwards": per_kind}


def catchup_tokens(output) -> dict[Model, int]:
    """Per model, the output positions it fed in multi-token forwards (`output.trace`): catch-up extends
    after a switch and speculative verifies, without the prompt's prefill."""
    n_prompt, counts = len(output.prompt_token_ids), {m: 0 for m in Model}
    for model, new, start in output.trace:
        if new > 1:
            counts[Model(model)] += max(0, start + new - max(start, n_prompt))
    return counts
