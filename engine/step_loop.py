"""The step loop: plan (C++) -> run each model's sub-batch -> read results back -> commit (C++).

With `max_inflight=2` (overlap) step t+1 is planned and queued before step t's results are committed: the
scheduler dispatches rows optimistically and fixes up the ones whose decision flipped. Plan and result
buffers alternate between two sets, so a step never overwrites what an in-flight step still reads.
"""
from __future__ import annotations

import time
from collections import deque
from typing import NamedTuple

import torch

from rstitch_engine.protocol import MODELS

from .model_runner import DeviceTables, ModelRunner
from .plan import HostPlan
from .readback import StepResults


class StepTiming(NamedTuple):
    """One model's part of one step, as the step-cost model (evaluation/step_cost.py) is fitted to it: `rows`
    rows feeding `tokens` new tokens over `context` tokens of attention (their seq_lens summed), `seconds` of
    the model's forward; `step_seconds` is the whole step's host time (plan, forwards, commit), the same for
    both models of a step."""
    step: int
    model: int
    rows: int
    tokens: int
    context: int
    seconds: float
    step_seconds: float


class StepLoop:
    def __init__(self, sched, runners: dict[int, ModelRunner], tables: DeviceTables, device: torch.device,
                 max_inflight: int):
        self.sched, self.runners, self.tables, self.device = sched, runners, tables, device
        self.max_inflight = max_inflight
        pin = device.type == "cuda"
        self.host = [{m: HostPlan(sched, pin) for m in runners} for _ in range(2)]
        self.table_updates = [torch.zeros(sched.table_update_size, dtype=torch.int32, pin_memory=pin)
                              for _ in range(2)]
        cap = next(iter(runners.values())).tokens.shape[0]
        self.results = [{m: StepResults(cap, device) for m in runners} for _ in range(2)]
        self.inflight: deque = deque()
        self.next_step = 0
        self.draft_logits: torch.Tensor | None = None
        self.timings: list[StepTiming] | None = None  # a list: every committed step's StepTiming rows go there

    def step(self) -> list:
        """Plans and launches one step, commits what is due; returns the commit events."""
        start = time.perf_counter()
        step, parity = self.next_step, self.next_step % 2
        self.next_step += 1
        plans, updates = self.host[parity], self.table_updates[parity]
        bufs = [(plans[m].i32_np, plans[m].f32_np) if m in plans else (None, None) for m in MODELS]
        rows = self.sched.plan(step, *bufs[0], *bufs[1], updates.numpy())
        if rows:
            self.tables.apply_updates(updates, self.sched.table_update_capacity)
            ran, shapes = [], []
            for m, runner in self.runners.items():
                n = plans[m].count("num_rows")
                if n == 0:
                    continue
                if self.timings is not None:  # host numbers of the plan: no device read
                    shapes.append((m, n, plans[m].count("num_tokens"), int(plans[m].views.seq_lens[:n].sum())))
                res = self.results[parity][m]
                key = runner.prepare(plans[m], self.draft_logits)
                res.begin()
                res.fetch(runner.results, *runner.run(plans[m], key, self.draft_logits))
                ran.append(m)
            self.inflight.append((step, parity, ran, shapes, start))
        events = []
        while self.inflight and (len(self.inflight) >= self.max_inflight or not rows):
            events += self.commit(*self.inflight.popleft())
        return events

    def commit(self, step: int, parity: int, ran: list[int], shapes: list, start: float) -> list:
        args, seconds = [], [0.0, 0.0]
        for m in MODELS:
            if m in ran:
                res = self.results[parity][m]
                seconds[m] = res.wait()
                args += res.numpy
            else:
                args += [None, None, None]
        events = self.sched.commit(step, *args, *seconds)
        if self.timings is not None:
            # with overlap the step's host time runs from its planning to its commit, one step later
            wall = time.perf_counter() - start
            self.timings += [StepTiming(step, m, rows, tokens, context, seconds[m], wall)
                             for m, rows, tokens, context in shapes]
        return events

    def drain(self) -> list:
        events = []
        while self.inflight:
            events += self.commit(*self.inflight.popleft())
        return events

    def ensure_draft_logits(self, k: int, vocab_limit: int, dtype: torch.dtype) -> None:
        """Sampled speculative decoding keeps each draft's SLM logits until its verification."""
        if self.draft_logits is None or self.draft_logits.shape[1] < k:
            assert not self.inflight, "draft buffers are resized between generate calls only"
            slots = self.tables.tokens.shape[0]
            self.draft_logits = torch.zeros(slots, k, vocab_limit, dtype=dtype, device=self.device)
            for runner in self.runners.values():  # graphs that use the draft logits hold the old buffer
                if runner.graphs is not None:
                    runner.graphs.forget(lambda flags: flags.uses_draft_logits)
