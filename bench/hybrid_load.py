"""Hybrid decoding under load (docs/benchmarks.md, 'Hybrid decoding under load'): calibrate the step simulator
on this machine, check it against the engine, and sweep the parking rule over batch sizes.

    python bench/hybrid_load.py calibrate --out DIR [--dry]   # engine runs: step costs, sim vs engine
    python bench/hybrid_load.py sweep --out DIR --patterns records.jsonl [--policy rstitch:0.02] [--dry]

calibrate: one engine (the demo pair in bf16; --dry: tiny random models on the CPU) records every step's
shape and time (Engine.step_timings) while LLM-only, SLM-only and R-Stitch batches of 1..16 requests run
(the fit set); the step cost (evaluation/step_cost.py) is fitted to those steps. Then R-Stitch batches of
the same sizes run on other prompts (the check set) with the default parking rule, and each is replayed
through the simulator from its own switching patterns, and LLM-only runs on the same prompts right after:
the simulator's tok/s and ratio to LLM-only beside the engine's (the ratio is the check that holds on a
machine whose speed drifts). Writes step_cost.json, validation.json/.md,
timings.jsonl (every step of the fit set) and records.jsonl (its R-Stitch answers' switching patterns,
which sweep can replay).

sweep: the recorded patterns (an eval's records.jsonl, field "sources") replayed at batches 1..64 under
each parking rule, priced twice: by this machine's fitted step cost and by an H200 roofline of the
1.5B/7B shapes (no GPU measured them). Writes sweep.json/.md and sweep.png.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from rstitch_engine import Engine, SamplingParams, policies
from rstitch_engine.bench import synthetic_prompts
from rstitch_engine.engine.ops import cpu_product_bounds
from rstitch_engine.evaluation import build_messages, collect_meta, synthetic_problems
from rstitch_engine.evaluation.simulator import simulate
from rstitch_engine.evaluation.step_cost import StepCost
from rstitch_engine.protocol import LLM, SLM
from rstitch_engine.random_models import SHAPES, streamed_bytes

# (share, min batch, max wait): the rules compared; (0, 1, 0) is no parking
RULES = [(0.0, 1, 0), (0.25, 1, 4), (0.5, 1, 4), (0.5, 1, 16), (0.75, 1, 4), (0.75, 1, 16), (0.0, 4, 8),
         (0.5, 4, 8)]
# An H200 (docs/benchmarks.md, 'Roofline'): measured copy bandwidth and dense bf16 rate on this workplace's
# machines (2026-10-28), and a CUDA-graph step's host time.
H200 = dict(bandwidth=4.3e12, peak_flops=790e12, host_ms=0.05)


def meta(**extra) -> dict:
    """evaluation's run metadata (device, versions, date, command) with Triton's version and the threads."""
    import triton

    return {**collect_meta(), "triton": triton.__version__, "threads": torch.get_num_threads(), **extra}


class Workload:
    """The engine and its prompts: the demo pair on chat-templated word problems, or (dry) tiny random models
    on random token prompts with a forced switching pattern in place of the entropy rule."""

    def __init__(self, dry: bool, max_tokens: int, tau: float):
        self.dry = dry
        if dry:
            # prefills chunked by 32 tokens: enough wide steps (17+ tokens in fp32) for the fit
            self.engine = Engine(slm="random:tiny", llm="random:small", device="cpu", kv_cache_gb=0.02,
                                 max_model_len=256, max_num_seqs=16, max_num_batched_tokens=32)
            self.rstitch = policies.Forced(llm_share=0.3, mean_run=2, seed=1)
        else:
            self.engine = Engine(slm="demo:slm", llm="demo:llm", device="cpu", dtype="bfloat16", max_num_seqs=16,
                                 max_model_len=1024)
            self.rstitch = policies.RStitch(tau=tau)
        self.params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=dry)

    def prompts(self, n: int, seed: int) -> list:
        if self.dry:
            return synthetic_prompts(n, 12, self.engine.vocab_limit, seed=seed)
        return [self.engine.tokenize(p, add_special_tokens=False) for p in
                self.engine.chat_prompts([build_messages(q["question"]) for q in synthetic_problems(n, seed)])]

    def run(self, prompts: list, policy):
        self.engine.reset_prefix_cache()  # every run starts cold: the policies run the same prompts in turn
        start = time.perf_counter()
        outs = self.engine.generate(prompts, self.params, policy, use_tqdm=False)
        return outs, time.perf_counter() - start


def calibrate(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Workload(args.dry, args.max_tokens, args.tau)
    work.run(work.prompts(2, 99), policies.Forced(llm_share=0.3, mean_run=2))  # warm-up
    batches = [1, 4, 8, 16]
    shape = dict(block_size=work.engine.config.block_size, max_step_tokens=work.engine.config.max_num_batched_tokens)
    # Fit set: LLM-only, SLM-only and R-Stitch (its catch-up extends) at each batch size.
    measured, records = {}, []
    with work.engine.step_timings() as timings:
        for b in batches:
            for name, policy in (("llm", policies.LLMOnly()), ("slm", policies.SLMOnly()), ("rstitch", work.rstitch)):
                outs, wall = work.run(work.prompts(b, b), policy)
                measured[name, b] = (outs, wall)
                print(f"{name} batch {b}: {sum(len(o.token_ids) for o in outs) / wall:.2f} tok/s", flush=True)
            records += [{"policy": work.rstitch.name, "batch_size": b, "sources": list(o.sources),
                         "prompt_tokens": len(o.prompt_token_ids)} for o in measured["rstitch", b][0]]
    cost = StepCost.fit(timings, bounds=cpu_product_bounds(work.engine.dtype), meta=meta(
        fitted_on="llm-only, slm-only and R-Stitch batches of " + ",".join(map(str, batches))))
    cost.save(out / "step_cost.json")
    # Check set: R-Stitch on other prompts, each batch replayed from its own switching patterns, and LLM-only
    # on the same prompts right after it: this VM's speed drifts by 10-20% over minutes, so the check that
    # counts is the ratio to LLM-only measured side by side, against the simulated ratio.
    share, wait = work.engine.config.llm_batch_share, work.engine.config.llm_max_wait
    rows = []
    for b in batches:
        prompts = work.prompts(b, 100 + b)
        llm_steps = work.engine.sched.llm_steps
        outs, wall = work.run(prompts, work.rstitch)
        llm_steps = work.engine.sched.llm_steps - llm_steps
        llm_outs, llm_wall = work.run(prompts, policies.LLMOnly())
        patterns, lens = [list(o.sources) for o in outs], [len(o.prompt_token_ids) for o in outs]
        sim = simulate(patterns, lens, cost, batch=b, llm_batch_share=share, llm_max_wait=wait, **shape)
        sim_llm = simulate([o.sources for o in llm_outs], [len(o.prompt_token_ids) for o in llm_outs], cost,
                           batch=b, llm_only=True, **shape)
        tokens = sum(len(o.token_ids) for o in outs)
        engine_llm = sum(len(o.token_ids) for o in llm_outs) / llm_wall
        engine_ratio, sim_ratio = tokens / wall / engine_llm, sim.tok_s / sim_llm.tok_s
        row = {"batch": b, "engine_tok_s": tokens / wall, "sim_tok_s": sim.tok_s,
               "sim_error_pct": 100 * (sim.tok_s / (tokens / wall) - 1),
               "engine_llm_only_tok_s": engine_llm, "sim_llm_only_tok_s": sim_llm.tok_s,
               "engine_ratio": engine_ratio, "sim_ratio": sim_ratio, "ratio_error_pct": 100 * (sim_ratio / engine_ratio - 1),
               "llm_share": sum(map(sum, patterns)) / tokens,
               "engine_llm_steps": llm_steps, "sim_llm_steps": sim.llm_steps}
        rows.append(row)
        print(json.dumps(row), flush=True)
    # every step of the fit set (a refit or a closer look needs no rerun)
    (out / "timings.jsonl").write_text("".join(json.dumps(t._asdict()) + "\n" for t in timings))
    (out / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))  # replayable by sweep
    result = {"meta": meta(policy=work.rstitch.name, parking={"llm_batch_share": share, "llm_max_wait": wait},
                           max_tokens=args.max_tokens), "rows": rows}
    (out / "validation.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Step simulator vs engine ({result['meta']['date']})", "",
             f"{result['meta']['device']}, torch {result['meta']['versions']['torch']}, {work.rstitch.name}, greedy, "
             f"{args.max_tokens} tokens max, parking share {share} / max wait {wait}. Step costs fitted to the "
             f"LLM-only, SLM-only and R-Stitch runs of the fit set; the rows below ran on other prompts (the check "
             f"set), R-Stitch then LLM-only on the same prompts; the ratio is R-Stitch's tok/s over LLM-only's. "
             f"Command: `{result['meta']['command']}`", "",
             "| batch | engine tok/s | simulated tok/s | error | LLM-only engine | LLM-only simulated | "
             "ratio engine | ratio simulated | ratio error | LLM share | LLM steps engine / simulated |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {r['engine_tok_s']:.2f} | {r['sim_tok_s']:.2f} | {r['sim_error_pct']:+.1f}% | "
              f"{r['engine_llm_only_tok_s']:.2f} | {r['sim_llm_only_tok_s']:.2f} | {r['engine_ratio']:.2f}x | "
              f"{r['sim_ratio']:.2f}x | {r['ratio_error_pct']:+.1f}% | {r['llm_share']:.0%} | "
              f"{r['engine_llm_steps']} / {r['sim_llm_steps']} |" for r in rows]
    (out / "validation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def rule_name(rule: tuple) -> str:
    share, min_batch, wait = rule
    if share == 0 and min_batch == 1:
        return "no parking"
    return ", ".join([*([f"share {share}"] if share else []), *([f"min {min_batch}"] if min_batch > 1 else []),
                      f"wait {wait}"])


def h200_cost(dtype=torch.bfloat16) -> StepCost:
    """The roofline step cost of the 1.5B (SLM) and 7B (LLM) shapes on an H200 (no GPU measured it)."""
    shapes = {}
    for m, name in ((SLM, "1.5b"), (LLM, "7b")):
        cfg = SHAPES[name]
        weight_bytes = streamed_bytes(cfg, dtype)
        shapes[m] = (weight_bytes, cfg.kv_bytes_per_token(dtype), weight_bytes / dtype.itemsize)
    return StepCost.roofline(shapes, **H200, meta={"device": "H200 roofline (not measured)", "shapes": "1.5b/7b"})


def load_patterns(path: Path, policy: str) -> tuple[list[list[int]], list[int]]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    mine = [r for r in records if r["policy"] == policy and "sources" in r]
    if not mine:
        raise SystemExit(f"{path}: no records of policy {policy!r} with recorded sources")
    return [r["sources"] for r in mine], [r["prompt_tokens"] for r in mine]


def sweep(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    patterns, lens = load_patterns(Path(args.patterns), args.policy)
    costs = {"this machine": StepCost.load(args.step_cost), "H200 roofline": h200_cost()}
    batches = [1, 2, 4, 8, 16] if args.dry else [1, 2, 4, 8, 16, 32, 64]
    rows = []
    for device, cost in costs.items():
        for b in batches:
            # as many requests as four full batches, cycling through the recorded patterns
            n = max(4 * b, len(patterns))
            pats, pl = [patterns[i % len(patterns)] for i in range(n)], [lens[i % len(lens)] for i in range(n)]
            base = simulate(pats, pl, cost, batch=b, llm_only=True)
            for share, min_batch, wait in RULES:
                r = simulate(pats, pl, cost, batch=b, llm_batch_share=share, llm_min_batch=min_batch,
                             llm_max_wait=wait)
                rows.append({"device": device, "batch": b, "share": share, "min_batch": min_batch, "max_wait": wait,
                             "tok_s": r.tok_s, "llm_only_tok_s": base.tok_s, "speedup": r.tok_s / base.tok_s,
                             "p90_vs_llm": r.p90_latency_s / base.p90_latency_s,
                             "llm_rows_per_step": r.llm_rows_per_step, "llm_wait_steps": r.llm_wait_steps})
    result = {"meta": meta(policy=args.policy, patterns=str(args.patterns), requests=len(patterns),
                           step_cost=str(args.step_cost), h200=H200), "rows": rows}
    (out / "sweep.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Parking rules under load, simulated ({result['meta']['date']})", "",
             f"Patterns: {len(patterns)} `{args.policy}` answers of `{args.patterns}`, cycled to 4 batches' worth. "
             f"Output tok/s over LLM-only's at the same batch (p90 latency over LLM-only's in brackets). "
             f"Command: `{result['meta']['command']}`", ""]
    for device in costs:
        lines += [f"## {device}", "", "| batch | " + " | ".join(map(rule_name, RULES)) + " |",
                  "|---:|" + "---:|" * len(RULES)]
        for b in batches:
            cells = [next(r for r in rows if r["device"] == device and r["batch"] == b
                          and (r["share"], r["min_batch"], r["max_wait"]) == rule) for rule in RULES]
            lines.append(f"| {b} | " + " | ".join(f"{c['speedup']:.2f}x ({c['p90_vs_llm']:.2f})" for c in cells) + " |")
        lines.append("")
    (out / "sweep.md").write_text("\n".join(lines))
    print("\n".join(lines))
    try:
        plot(rows, costs, batches, out / "sweep.png")
    except ImportError as e:
        print(f"no sweep.png: {e}")


def plot(rows, costs, batches, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(costs), figsize=(6 * len(costs), 4), squeeze=False)
    for ax, device in zip(axes[0], costs):
        for rule in RULES:
            ys = [next(r["speedup"] for r in rows if r["device"] == device and r["batch"] == b
                       and (r["share"], r["min_batch"], r["max_wait"]) == rule) for b in batches]
            ax.plot(batches, ys, marker="o", label=rule_name(rule))
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (running requests)")
        ax.set_ylabel("output tok/s vs LLM-only")
        ax.set_title(device)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("calibrate")
    c.add_argument("--out", required=True)
    c.add_argument("--max-tokens", type=int, default=64)
    c.add_argument("--tau", type=float, default=0.02)
    c.add_argument("--dry", action="store_true", help="tiny random models (CI)")
    s = sub.add_parser("sweep")
    s.add_argument("--out", required=True)
    s.add_argument("--patterns", required=True, help="an eval's records.jsonl with recorded sources")
    s.add_argument("--policy", default="rstitch:0.02")
    s.add_argument("--step-cost", required=True, help="step_cost.json from calibrate")
    s.add_argument("--dry", action="store_true", help="fewer batch sizes (CI)")
    args = p.parse_args(argv)
    calibrate(args) if args.command == "calibrate" else sweep(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
