"""The step simulator (docs/method.md, 'Scheduling the LLM under load'): recorded switching patterns of real
requests (each output token's source, `RequestOutput.sources`) replayed through the engine's own C++
scheduler, its parking rule included, with every step priced by a StepCost (evaluation/step_cost.py) instead
of run. The scheduler sees each request as the policy `Forced` with its recorded pattern, so a request
produces the same sources in the same order as it did for real (the SLM's token discarded where the LLM takes
over, catch-up extends where a model rejoins), and only the batching around it changes with the rule and the
batch size. It predicts what the engine would measure: output tok/s, per-request latency, LLM steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import _C
from ..engine.plan import HostPlan, PlanLayout
from ..protocol import LLM, MODELS, SLM
from .step_cost import StepCost

ENTROPY = 0.5  # any finite entropy: the forced thresholds (+-inf) decide every row


@dataclass
class SimResult:
    tokens: int
    seconds: float
    latencies: list[float]   # per request, from the start to its last token (all start at 0: one batch)
    steps: int
    llm_steps: int
    llm_rows_per_step: float
    llm_wait_steps: float    # mean per request

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def mean_latency_s(self) -> float:
        return float(np.mean(self.latencies))

    @property
    def p90_latency_s(self) -> float:
        return float(np.percentile(self.latencies, 90))


def simulate(patterns: list[list[int]], prompt_lens: list[int], cost: StepCost, *, batch: int,
             llm_only: bool = False, llm_batch_share: float = 0.0, llm_min_batch: int = 1, llm_max_wait: int = 0,
             block_size: int = 16, max_step_tokens: int = 2048) -> SimResult:
    """Replays one offline batch: every request submitted at time 0, at most `batch` running at once (the
    engine's max_num_seqs). `patterns[i]` is request i's sources (0 SLM, 1 LLM) and sets its length;
    `llm_only` runs the same lengths as LLM-only requests instead (the baseline)."""
    if len(patterns) != len(prompt_lens) or not patterns:
        raise ValueError("simulate: one prompt length per pattern, and at least one pattern")
    longest = max(len(p) + n for p, n in zip(patterns, prompt_lens)) + 1
    c = _C.SchedulerConfig()
    c.block_size, c.max_num_seqs, c.max_model_len = block_size, batch, longest
    c.num_blocks = batch * (-(-longest // block_size)) + 1
    c.max_step_tokens, c.max_logits_rows = max_step_tokens, max(batch, 4)
    c.has_model, c.vocab_size = (True, True), 2
    c.llm_batch_share, c.llm_min_batch, c.llm_max_wait = llm_batch_share, llm_min_batch, llm_max_wait
    sched = _C.Scheduler(c)
    for i, (pattern, n) in enumerate(zip(patterns, prompt_lens)):
        spec = _C.RequestSpec()
        spec.id, spec.prompt, spec.max_tokens = i, [1] * n, len(pattern)
        if llm_only:
            spec.start_model = LLM
        else:
            spec.forced = list(pattern)
        if why := sched.add(spec):
            raise ValueError(f"simulate: request {i}: {why}")
    plans = {m: HostPlan(PlanLayout.of(sched, c.max_step_tokens), pin=False) for m in MODELS}
    updates = np.zeros(sched.table_update_size, dtype=np.int32)
    clock, step, finished, llm_steps, llm_rows = 0.0, 0, {}, 0, 0
    while sched.has_unfinished():
        if not sched.plan(step, plans[SLM].i32_np, plans[SLM].f32_np, plans[LLM].i32_np, plans[LLM].f32_np, updates):
            raise RuntimeError("simulate: the scheduler planned an empty step with requests left")
        shapes, results = [], []
        for m in MODELS:
            plan = plans[m]
            rows, logits = plan.count("num_rows"), plan.count("num_logits")
            if rows:
                shapes.append((m, rows, plan.count("num_tokens"), int(plan.views.seq_lens[:rows].sum())))
            entropies = np.full(logits, ENTROPY, dtype=np.float32)
            if m == SLM:
                flags = np.where(entropies <= plan.views.tau_up[:logits], _C.KEEP, _C.NEXT_LLM)
            else:
                flags = np.where(entropies > plan.views.tau_down[:logits], _C.KEEP | _C.NEXT_LLM, _C.KEEP)
            results += [np.zeros(logits, np.int32), entropies, flags.astype(np.int32)] if rows else [None] * 3
        clock += cost.step_ms(shapes) / 1e3
        forward_s = {shape[0]: cost.model_ms(*shape) / 1e3 for shape in shapes}
        llm_steps += LLM in forward_s
        llm_rows += sum(rows for m, rows, *_ in shapes if m == LLM)
        for rid, *_, finish in sched.commit(step, *results, *(forward_s.get(m, 0.0) for m in MODELS)):
            if finish is not None:
                finished[rid] = clock
        step += 1
    outs = [sched.output(i) for i in range(len(patterns))]
    return SimResult(tokens=sum(len(o["token_ids"]) for o in outs), seconds=clock,
                     latencies=[finished[i] for i in range(len(patterns))], steps=step, llm_steps=llm_steps,
                     llm_rows_per_step=llm_rows / llm_steps if llm_steps else 0.0,
                     llm_wait_steps=float(np.mean([o["stats"]["llm_wait_steps"] for o in outs])))
