"""The engine core (vLLM v1's layering): the C++ scheduler and an executor, and the step loop between them:
plan (C++) -> execute each model's sub-batch (the executor's workers) -> read results back -> commit (C++).

With `max_inflight=2` (overlap) step t+1 is planned and launched before step t's results are committed: the
scheduler dispatches rows optimistically and fixes up the ones whose decision flipped. Plan, table-update and
result buffers alternate between two sets, so a step never overwrites what an in-flight step still reads.
The Engine (python/rstitch_engine/api.py) is the front: it turns requests into scheduler specs and commit
events into outputs.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path
from typing import NamedTuple

import torch

from rstitch_engine import _C
from rstitch_engine.config import ModelConfig
from rstitch_engine.engine_config import EngineConfig
from rstitch_engine.protocol import MODELS

from .executor import Executor
from .mp_executor import MultiprocExecutor
from .kv_pool import num_blocks_for_budget
from .plan import HostPlan, PlanLayout

log = logging.getLogger("rstitch_engine")


class StepTiming(NamedTuple):
    """One model's part of one step, as the step-cost model (evaluation/step_cost.py) and the latency model
    (router/calibrate.py) are fitted to it: `rows` rows feeding `tokens` new tokens over `context` tokens of
    attention (their seq_lens summed) with `logits` logits rows, `seconds` of the model's forward;
    `step_seconds` is the whole step's host time (plan, forwards, commit), the same for both models of a step."""
    step: int
    model: int
    rows: int
    tokens: int
    context: int
    logits: int
    seconds: float
    step_seconds: float


class EngineCore:
    def __init__(self, config: EngineConfig, models: dict[int, ModelConfig], paths: dict[int, Path | None], *,
                 vocab_limit: int, max_model_len: int):
        # the weights first: on CUDA the KV budget is a share of the memory they leave free
        executor = MultiprocExecutor if config.tensor_parallel_size > 1 else Executor
        self.executor = executor(config, models, paths, vocab_limit=vocab_limit)
        num_blocks, self.max_model_len = _pool_size(config, list(models.values()), config.torch_dtype,
                                                    max_model_len)
        self.scheduler_config = config.scheduler_config(
            _C, num_blocks=num_blocks, max_model_len=self.max_model_len, vocab_size=vocab_limit,
            has_model=(0 in models, 1 in models))
        self.sched = _C.Scheduler(self.scheduler_config)
        self.layout = layout = PlanLayout.of(self.sched, self.scheduler_config.max_step_tokens)
        self.executor.collective_rpc("init_cache", layout, num_blocks=num_blocks, max_model_len=self.max_model_len)
        pin = config.torch_device.type == "cuda"
        self.host = [{m: HostPlan(layout, pin) for m in models} for _ in range(2)]
        self.table_updates = [torch.zeros(layout.table_update_size, dtype=torch.int32, pin_memory=pin)
                              for _ in range(2)]
        self.max_inflight = self.scheduler_config.max_inflight
        self.inflight: deque = deque()
        self.next_step = 0
        self.timings: list[StepTiming] | None = None  # a list: every committed step's StepTiming rows go there
        self.draft_k = 0  # sampled drafts per slot the workers' draft-logits buffers hold

    def step(self) -> list:
        """Plans and launches one step, commits what is due; returns the commit events."""
        start = time.perf_counter()
        step, parity = self.next_step, self.next_step % 2
        self.next_step += 1
        plans, updates = self.host[parity], self.table_updates[parity]
        bufs = [(plans[m].i32_np, plans[m].f32_np) if m in plans else (None, None) for m in MODELS]
        rows = self.sched.plan(step, *bufs[0], *bufs[1], updates.numpy())
        if rows:
            shapes = []
            if self.timings is not None:  # host numbers of the plan: no device read
                shapes = [(m, n, plan.count("num_tokens"), int(plan.views.seq_lens[:n].sum()), plan.count("num_logits"))
                          for m, plan in plans.items() if (n := plan.count("num_rows"))]
            ran = self.executor.execute(parity, plans, updates)
            self.inflight.append((step, parity, ran, shapes, start))
        events = []
        while self.inflight and (len(self.inflight) >= self.max_inflight or not rows):
            events += self.commit(*self.inflight.popleft())
        return events

    def commit(self, step: int, parity: int, ran: list[int], shapes: list, start: float) -> list:
        args, seconds = [], [0.0, 0.0]
        for m in MODELS:
            if m in ran:
                results, seconds[m] = self.executor.step_results(parity, m)
                args += results
            else:
                args += [None, None, None]
        events = self.sched.commit(step, *args, *seconds)
        if self.timings is not None:
            # with overlap the step's host time runs from its planning to its commit, one step later
            wall = time.perf_counter() - start
            self.timings += [StepTiming(step, m, rows, tokens, context, logits, seconds[m], wall)
                             for m, rows, tokens, context, logits in shapes]
        return events

    def drain(self) -> list:
        events = []
        while self.inflight:
            events += self.commit(*self.inflight.popleft())
        return events

    def ensure_draft_logits(self, k: int, dtype: torch.dtype) -> None:
        """Room for k sampled drafts per sequence slot on every worker; it grows with no step in flight only."""
        if k > self.draft_k:
            assert not self.inflight, "drain the in-flight steps before the draft buffers grow"
            self.executor.collective_rpc("grow_draft_logits", k, dtype)
            self.draft_k = k


def _pool_size(config: EngineConfig, models: list[ModelConfig], dtype: torch.dtype,
               max_model_len: int) -> tuple[int, int]:
    """(KV blocks per pool, the context limit those blocks allow). The pool never holds more than
    max_num_seqs full-length requests; a budget too small for one full-length request lowers the limit."""
    budget = config.kv_budget_bytes()
    block = config.block_size
    num_blocks = min(num_blocks_for_budget(budget, block, models, dtype),
                     -(-config.max_num_seqs * max_model_len // block))
    if num_blocks < 1:
        per_token = sum(c.kv_bytes_per_token(dtype) for c in models)
        raise ValueError(f"kv_cache_gb: a KV budget of {budget / 2**30:.3f} GB holds no block of {block} tokens "
                         f"({per_token * block / 2**20:.2f} MB a block for both models); raise kv_cache_gb")
    if num_blocks * block < max_model_len:
        held = num_blocks * block
        # Requested explicitly: a warning; the models' default context lowered: information only.
        level = logging.WARNING if config.max_model_len is not None else logging.INFO
        log.log(level, "max_model_len lowered from %d to %d tokens (prompt + output): that is what a KV cache of "
                "%.2f GiB holds for both models (kv_cache_gb: %s). kv_cache_gb=%.1f holds the full %d; a smaller "
                "max_model_len silences this", max_model_len, held, budget / 2**30, EngineConfig.help("kv_cache_gb"),
                budget / 2**30 * max_model_len / held, max_model_len)
        max_model_len = held
    return num_blocks, max_model_len
