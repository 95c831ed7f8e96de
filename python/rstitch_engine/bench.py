"""`rstitch bench`: every policy on the same engine, prompts and hardware, in one run, side by side.

Per policy: latency per request (mean, p50, p90), throughput (all tokens / wall time), decode speed of a
request (tokens after its first / time after its first), the LLM's share of tokens, switches per 1k
tokens, draft acceptance (speculative), and the throughput over LLM-only's (`tok_s_vs_llm`, a tok/s ratio;
`rstitch eval`'s `latency_speedup_vs_llm` is a latency ratio). Forced policies get one seed per request, so
batched rows switch independently.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from .policies import Forced, LLMOnly, Policy
from .switching import switching_stats
from .sampling_params import SamplingParams

COLUMNS = ["policy", "batch", "requests", "tokens", "tok_s", "decode_tok_s", "mean_latency_s", "p50_latency_s",
           "p90_latency_s", "llm_share", "switches_per_1k", "mean_llm_run", "mean_slm_run", "acceptance",
           "stale_rows", "tok_s_vs_llm"]


def _sync(engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)  # NOTE: outside the timed loop, brackets the measurement


def _per_request(policy: Policy, n: int) -> list[Policy]:
    if isinstance(policy, Forced) and policy.llm_share is not None:
        return [dataclasses.replace(policy, seed=policy.seed + i) for i in range(n)]
    return [policy] * n


def _quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1] if len(values) > 1 else values[0]


def time_policy(engine, prompts: list[list[int]], params: SamplingParams, policy: Policy) -> dict:
    """One timed generate() of all prompts (after a short warm-up) and its metrics."""
    warm = dataclasses.replace(params, max_tokens=min(params.max_tokens, 8))
    engine.generate(prompts[:2], warm, policy, use_tqdm=False)
    engine.reset_prefix_cache()  # the timed run starts cold, whatever ran before (the warm-up, other policies)
    first: dict[int, float] = {}
    last: dict[int, float] = {}

    def stamp(i, tokens, sources):
        now = time.perf_counter()
        first.setdefault(i, now)
        last[i] = now

    _sync(engine)
    start = time.perf_counter()
    with engine.step_timings() as steps:  # each model's time per step, measured by the loop anyway: no sync
        outs = engine.generate(prompts, params, _per_request(policy, len(prompts)), use_tqdm=False,
                               on_tokens=stamp)
    _sync(engine)
    wall = time.perf_counter() - start
    switching = switching_stats(outs, steps)
    tokens = sum(len(o.token_ids) for o in outs)
    latencies = [o.stats["latency_s"] for o in outs]
    total = lambda key: sum(o.stats[key] for o in outs)  # noqa: E731
    decode = [(len(o.token_ids) - 1) / (last[i] - first[i]) for i, o in enumerate(outs)
              if len(o.token_ids) > 1 and last[i] > first[i]]
    return {
        "policy": policy.name, "batch": len(prompts), "requests": len(outs), "tokens": tokens,
        "tok_s": tokens / wall, "decode_tok_s": statistics.mean(decode) if decode else None,
        "mean_latency_s": statistics.mean(latencies), "p50_latency_s": _quantile(latencies, 0.5),
        "p90_latency_s": _quantile(latencies, 0.9), "llm_share": total("llm_tokens") / max(tokens, 1),
        "switches_per_1k": switching["switches_per_1k"], "mean_llm_run": switching["llm_runs"]["mean"],
        "mean_slm_run": switching["slm_runs"]["mean"], "switching": switching,
        "acceptance": total("accepted") / total("drafted") if total("drafted") else None,
        "stale_rows": total("stale_rows"), "wall_s": wall,
        "traces": [o.trace for o in outs],
    }


def run_bench(engine, prompts: list[list[int]], policies: list[Policy], params: SamplingParams) -> list[dict]:
    """Times each policy (LLM-only first when the LLM is loaded, as the baseline) and adds `tok_s_vs_llm`,
    its throughput over LLM-only's (None without the LLM)."""
    order = list(policies)
    if 1 in engine.paths and not any(isinstance(p, LLMOnly) for p in order):
        order.insert(0, LLMOnly())
    rows = [time_policy(engine, prompts, params, p) for p in order]
    base = next((r for r in rows if r["policy"] == "llm"), None)
    for r in rows:
        r["tok_s_vs_llm"] = r["tok_s"] / base["tok_s"] if base else None
    return rows


def copy_bandwidth(device: torch.device | str, num_bytes: int | None = None) -> float:
    """Bytes read plus written per second by a large copy on `device` (median of 10 after 2 warm-ups; CUDA
    events on a GPU): the measured bandwidth every "% of roofline" in this repository divides by.
    `num_bytes` defaults to 1 GiB on CUDA and 256 MiB on the CPU (past its caches)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = num_bytes or (2**30 if cuda else 2**28)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()  # NOTE: a measurement, outside any decode loop
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
    return 2 * n / statistics.median(times[2:])


def synthetic_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (n, length), generator=g).tolist()


def tok_s_plot(rows: list[dict], path, title: str) -> None:
    """Throughput per policy as bars (matplotlib Agg, imported lazily)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar([r["policy"] for r in rows], [r["tok_s"] for r in rows], color="tab:blue")
    ax.set_ylabel("tokens / s")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    fig.savefig(path, dpi=120)
