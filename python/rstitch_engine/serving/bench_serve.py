"""`rstitch bench serve`: a client-side load generator for the server, measured as `vllm bench serve`
measures (docs/serving.md, 'How rstitch bench serve measures'): TTFT from sending to the first content chunk, ITL
between chunks, TPOT = (E2EL - TTFT) / (output tokens - 1), E2EL to the last chunk; goodput counts requests
within every --goodput limit. Plus what is specific to hybrid decoding: the LLM's token share and switches
per 1k tokens, from each response's `rstitch` statistics.

Requests stream chat completions of word problems, at a fixed concurrency and/or Poisson arrivals; each
pass is bounded in requests and seconds, and only loopback servers are loaded. With --slm/--llm (no
--base-url) the server runs in this process, and at concurrency 1 the same prompts are also run through
offline `Engine.generate`, one at a time, on the same engine: the server's overhead as a throughput ratio.
Each pass on an in-process server starts with an empty prefix cache (`--system-prompt-words` gives every
request a shared system message: the prefix-caching workload).
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx

from . import API_KEY_ENV, is_loopback

PERCENTILES = (50, 90, 99)
COLUMNS = ["policy", "concurrency", "request_rate", "completed", "failed", "req_s", "output_tok_s", "goodput_req_s",
           "ttft_ms_mean", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_mean", "tpot_ms_p50", "tpot_ms_p99", "itl_ms_p50",
           "itl_ms_p99", "e2el_ms_mean", "e2el_ms_p99", "llm_share", "switches_per_1k", "llm_wait_ms_mean",
           "prefix_hit_rate_slm", "prefix_hit_rate_llm", "offline_tok_s", "server_vs_offline"]


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    rstitch: dict = field(default_factory=dict)
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2el - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def check_loopback(url: str) -> str:
    host = urlparse(url).hostname
    if host is None or not is_loopback(host):
        raise ValueError(f"--base-url {url!r}: only loopback servers are loaded (127.0.0.1, ::1, localhost)")
    return url.rstrip("/")


def parse_goodput(text: str | None) -> dict[str, float]:
    """'ttft:500,tpot:50' -> {"ttft": 0.5, "tpot": 0.05} (seconds); keys ttft, tpot, e2el."""
    limits = {}
    for part in filter(None, (text or "").split(",")):
        key, _, ms = part.partition(":")
        if key not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"--goodput {text!r}: {key!r} is not ttft, tpot or e2el")
        try:
            limits[key] = float(ms) / 1000
        except ValueError:
            raise ValueError(f"--goodput {text!r}: {ms!r} is not a number of milliseconds") from None
        if not limits[key] > 0:
            raise ValueError(f"--goodput {text!r}: limits must be positive")
    return limits


async def one_request(client: httpx.AsyncClient, body: dict) -> RequestResult:
    """Streams one chat completion and times it."""
    start = time.perf_counter()
    last, result = None, RequestResult(ok=False)
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    return result
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                    result.rstitch = chunk.get("rstitch", {})
                if not any(c.get("delta", {}).get("content") for c in chunk["choices"]):
                    continue
                if last is None:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.e2el = (last or time.perf_counter()) - start
    result.ok = True
    return result


async def run_pass(base_url: str, bodies: list[dict], *, concurrency: int | None, request_rate: float | None,
                   seed: int, timeout_s: float, api_key: str | None = None) -> tuple[list[RequestResult], float]:
    """Sends every body (arrivals: Poisson at request_rate, else at once; at most `concurrency` in flight),
    with `api_key` as a bearer token if given; returns the results and the pass's duration. Requests still
    running at timeout_s are cancelled."""
    rng = random.Random(seed)
    limit = asyncio.Semaphore(concurrency or len(bodies))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(timeout_s), headers=headers) as client:
        async def send(body: dict, delay: float) -> RequestResult:
            await asyncio.sleep(delay)
            async with limit:
                return await one_request(client, body)

        delays, t = [], 0.0
        for _ in bodies:
            delays.append(t)
            if request_rate:
                t += rng.expovariate(request_rate)
        start = time.perf_counter()
        tasks = [asyncio.create_task(send(b, d)) for b, d in zip(bodies, delays)]
        done, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        duration = time.perf_counter() - start
    results = [t.result() if t in done else RequestResult(ok=False, error="timed out") for t in tasks]
    return results, duration


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


def summarize(results: list[RequestResult], duration: float, goodput: dict[str, float]) -> dict:
    ok = [r for r in results if r.ok]
    ms = lambda v: None if v is None else 1000 * v  # noqa: E731
    row = {"completed": len(ok), "failed": len(results) - len(ok),
           "req_s": len(ok) / duration if duration else None,
           "output_tok_s": sum(r.output_tokens for r in ok) / duration if duration else None}
    series = {"ttft": [r.ttft for r in ok], "tpot": [r.tpot for r in ok if r.tpot is not None],
              "itl": [x for r in ok for x in r.itl], "e2el": [r.e2el for r in ok]}
    for name, values in series.items():
        row[f"{name}_ms_mean"] = ms(statistics.mean(values)) if values else None
        for q in PERCENTILES:
            row[f"{name}_ms_p{q}"] = ms(_percentile(values, q))
    if goodput:
        good = [r for r in ok if all((getattr(r, k) or 0.0) <= limit for k, limit in goodput.items())]
        row["goodput_req_s"] = len(good) / duration if duration else None
    tokens = {k: sum(r.rstitch.get(k, 0) for r in ok) for k in ("slm_tokens", "llm_tokens", "switches_to_llm",
                                                                 "switches_to_slm")}
    produced = tokens["slm_tokens"] + tokens["llm_tokens"]
    row["llm_share"] = tokens["llm_tokens"] / produced if produced else None
    row["switches_per_1k"] = 1000 * (tokens["switches_to_llm"] + tokens["switches_to_slm"]) / produced \
        if produced else None
    waits = [r.rstitch["llm_wait_s"] for r in ok if "llm_wait_s" in r.rstitch]  # parked for an LLM batch
    row["llm_wait_ms_mean"] = ms(statistics.mean(waits)) if waits else None
    queried = sum(r.rstitch.get("prefix_queries", 0) for r in ok)
    for model in ("slm", "llm"):  # prompt tokens whose KV the prefix cache held, per model
        hits = sum(r.rstitch.get(f"prefix_hits_{model}", 0) for r in ok)
        row[f"prefix_hit_rate_{model}"] = hits / queried if queried else None
    row["errors"] = sorted({r.error for r in results if not r.ok})[:5]
    return row


def shared_system_prompt(words: int) -> str:
    """A fixed system message of about `words` words (the shared-prefix workload: every request repeats it)."""
    sentence = ("You are a careful assistant for arithmetic word problems. Read every number, keep track of the "
                "units, ignore facts the question does not need, and check the result before you answer.").split()
    return " ".join(sentence[i % len(sentence)] for i in range(words))


def request_bodies(questions: list[str], policies: list[str], *, model: str | None, max_tokens: int,
                   temperature: float, seed: int | None, system_prompt_words: int = 0) -> list[dict]:
    """One streamed chat request per question, after a shared system message of `system_prompt_words` words
    if asked; policies assigned round-robin (one policy: all of them)."""
    from ..evaluation import build_messages

    system = [{"role": "system", "content": shared_system_prompt(system_prompt_words)}] if system_prompt_words else []
    bodies = []
    for i, q in enumerate(questions):
        body = {"messages": system + build_messages(q), "max_tokens": max_tokens, "temperature": temperature, "stream": True,
                "stream_options": {"include_usage": True}, "rstitch": {"policy": policies[i % len(policies)]}}
        if model:
            body["model"] = model
        if seed is not None:
            body["seed"] = seed + i
        bodies.append(body)
    return bodies


def offline_tok_s(engine, questions: list[str], policy: str, *, max_tokens: int, temperature: float,
                  seed: int | None) -> float:
    """Output tokens per second of offline chat generation of the same requests, one at a time."""
    from .. import SamplingParams
    from ..evaluation import build_messages
    from ..policies import parse_policy

    tokens, start = 0, time.perf_counter()
    for i, q in enumerate(questions):
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                seed=None if seed is None else seed + i)
        [out] = engine.chat([build_messages(q)], params, parse_policy(policy), use_tqdm=False)
        tokens += len(out.token_ids)
    return tokens / (time.perf_counter() - start)


def add_arguments(p) -> None:
    from ..cli_args import problem_args

    p.add_argument("--base-url", help="a running server, http://127.0.0.1:PORT (loopback only); without it, a "
                                      "server on --slm/--llm is started in this process")
    p.add_argument("--policies", default="llm,rstitch:0.05",
                   help="comma-separated policies, one pass each (sent as the rstitch.policy field)")
    p.add_argument("--mix", action="store_true", help="one pass with the policies assigned round-robin instead")
    p.add_argument("--concurrency", default="1", help="comma-separated concurrency levels, one pass each")
    p.add_argument("--request-rate", type=float, help="Poisson arrivals at this many requests per second "
                                                      "(default: all at once, bounded by --concurrency)")
    problem_args(p, synthetic=16)
    p.add_argument("--max-tokens", type=int, default=128, help="most new tokens per request")
    p.add_argument("--system-prompt-words", type=int, default=0, metavar="WORDS",
                   help="a shared system message of this many words before every question (the prefix-caching "
                        "workload; default: none)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    p.add_argument("--seed", type=int, help="request i samples with seed + i (default: unseeded)")
    p.add_argument("--goodput", metavar="ttft:MS,tpot:MS", help="SLO limits for goodput, in milliseconds")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds a pass may take (requests left are "
                                                                 "cancelled)")
    p.add_argument("--model", help="the model name to send (default: the server's)")
    p.add_argument("--api-key", metavar="KEY", help="with --base-url: the server's API key (default: the "
                                                    "RSTITCH_API_KEY environment variable)")
    p.add_argument("--no-offline", action="store_true", help="with --slm/--llm: skip the offline comparison")
    p.add_argument("--out", help="folder for bench_serve.json / bench_serve.md (default: print only)")


def run_from_args(args) -> list[dict]:
    from ..cli_args import chosen_problems, make_engine
    from ..evaluation import markdown_table, write_results
    from ..policies import parse_policies

    policies = [p.strip() for p in args.policies.split(",")]
    parse_policies(args.policies)  # a bad policy fails here, not as 400s
    levels = [int(c) for c in args.concurrency.split(",")]
    if any(c < 1 for c in levels):
        raise ValueError(f"--concurrency {args.concurrency!r}: levels must be >= 1")
    if args.system_prompt_words < 0:
        raise ValueError(f"--system-prompt-words {args.system_prompt_words}: must be >= 0")
    goodput = parse_goodput(args.goodput)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    problems, _ = chosen_problems(args)
    questions = [p["question"] for p in problems]
    passes = [(["mix:" + "+".join(policies)], policies)] if args.mix else [([p], [p]) for p in policies]
    engine = server = None
    if args.base_url:
        base_url = check_loopback(args.base_url)
    else:
        from ..policies import LLMOnly
        from .app import ServerConfig
        from .server import ServerThread

        engine = make_engine(args)
        server = ServerThread(engine, ServerConfig(args.model or "rstitch", LLMOnly())).__enter__()
        base_url = server.url
    rows = []
    try:
        for label, mix in passes:
            for c in levels:
                if engine is not None:  # every pass starts cold: no pass reuses the prompts of the one before
                    engine.reset_prefix_cache()
                bodies = request_bodies(questions, mix, model=args.model, max_tokens=args.max_tokens,
                                        temperature=args.temperature, seed=args.seed,
                                        system_prompt_words=args.system_prompt_words)
                results, duration = asyncio.run(run_pass(base_url, bodies, concurrency=c,
                                                         request_rate=args.request_rate, seed=args.problem_seed,
                                                         timeout_s=args.timeout, api_key=api_key))
                row = {"policy": label[0], "concurrency": c, "request_rate": args.request_rate,
                       **summarize(results, duration, goodput)}
                if engine is not None and c == 1 and not args.mix and not args.no_offline:
                    row["offline_tok_s"] = offline_tok_s(engine, questions, mix[0], max_tokens=args.max_tokens,
                                                         temperature=args.temperature, seed=args.seed)
                    row["server_vs_offline"] = row["output_tok_s"] / row["offline_tok_s"]
                rows.append(row)
                print(markdown_table([row], [k for k in COLUMNS if row.get(k) is not None]), flush=True)
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    if args.out:
        meta = {"base_url": args.base_url or "in-process", "slm": args.slm if engine else None,
                "llm": args.llm if engine else None, "dtype": str(engine.dtype) if engine else None,
                "max_tokens": args.max_tokens, "problems": len(questions),
                "system_prompt_words": args.system_prompt_words,
                "prefix_caching": engine.config.prefix_caching if engine else None}
        json_path, md_path = write_results(args.out, "bench_serve", rows, meta)
        print(f"wrote {json_path}, {md_path}")
    return rows
