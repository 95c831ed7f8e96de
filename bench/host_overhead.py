"""Host cost of one step, per batch size: the C++ scheduler's plan() + commit() through the bindings, and
the whole Python step loop around them (plan buffers, padding, copies, readback) with the device work of a
decode step removed.

    python bench/host_overhead.py

With overlap this work runs while the device executes the previous step, so it must stay below a
decode step (about 1 ms for a 1.5B model on an H100). Rows decode steadily (every token kept), as in
the SLM's common case. Prints a table and writes bench/results/host-overhead-<date>.json/.md.
"""
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from rstitch_engine import _C

RESULTS = Path(__file__).resolve().parent / "results"


def measure(batch: int, steps: int = 200) -> dict:
    c = _C.SchedulerConfig()
    c.num_blocks, c.block_size, c.max_num_seqs, c.max_model_len = 64 * 1024, 16, 256, 4096
    c.max_step_tokens, c.max_logits_rows, c.vocab_size, c.has_model = 4096, 512, 1000, (True, True)
    sched = _C.Scheduler(c)
    for i in range(batch):
        spec = _C.RequestSpec()
        spec.id, spec.prompt, spec.max_tokens, spec.tau_up, spec.tau_down = i, list(range(1, 129)), 4000, 0.5, 0.5
        sched.add(spec)
    bufs = [np.zeros(sched.i32_size, np.int32), np.zeros(sched.f32_size, np.float32)] * 2
    updates = np.zeros(sched.table_update_size, np.int32)
    cap = 512
    tokens, entropies, flags = np.ones(cap, np.int32), np.zeros(cap, np.float32), np.full(cap, _C.KEEP, np.int32)
    plan_s, commit_s = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        sched.plan(step, *bufs, updates)
        t1 = time.perf_counter()
        sched.commit(step, tokens, entropies, flags, None, None, None, 0.0, 0.0)
        t2 = time.perf_counter()
        if step > 2:  # the first steps prefill the prompts
            plan_s.append(t1 - t0)
            commit_s.append(t2 - t1)
    plan_us, commit_us = statistics.median(plan_s) * 1e6, statistics.median(commit_s) * 1e6
    return {"batch": batch, "plan_us": plan_us, "commit_us": commit_us, "per_row_us": (plan_us + commit_us) / batch}


def loop_us(engine, batch: int, steps: int = 256) -> float:
    """Per-step time of Engine.generate for `batch` SLM-only rows when a decode step's graph replay does
    nothing: the host's share of a step (CPU, emulated graphs; the prompt's prefill is the one real forward)."""
    from rstitch_engine import SamplingParams, policies

    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    prompts = [[5 + i % 50, 6, 7, 8] for i in range(batch)]
    engine.generate(prompts, params, policy=policies.SLMOnly(), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    engine.generate(prompts, params, policy=policies.SLMOnly(), use_tqdm=False)
    return (time.perf_counter() - t0) / steps * 1e6


def main() -> None:
    from rstitch_engine import Engine
    from rstitch_engine.engine.cuda_graphs import StepGraphs

    StepGraphs.replay = lambda self, key: None  # the device work of a step, removed
    engine = Engine(slm="random:tiny", llm="random:tiny", device="cpu", dtype="float32", cuda_graphs="emulate",
                    overlap=True, max_num_seqs=256, progress=False)
    rows = [{**measure(b), "loop_us": loop_us(engine, b)} for b in (1, 8, 32, 128, 256)]
    meta = {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "date": datetime.date.today().isoformat(), "python": platform.python_version()}
    lines = ["| batch | plan (us) | commit (us) | per row (us) | Python step loop (us) |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {r['plan_us']:.1f} | {r['commit_us']:.1f} | {r['per_row_us']:.2f} | {r['loop_us']:.0f} |"
              for r in rows]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"host-overhead-{meta['date']}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(f"# Host cost per step (scheduler alone; whole Python step loop without device work)\n\n{table}\n\n{json.dumps(meta)}\n")


if __name__ == "__main__":
    main()
