"""CUDA graphs of whole steps, per model and (rows, span) bucket: embedding, layers, final norm, LM head and
the stitch step, replayed over the fixed-address device plan.

span 1 is a decode step (rows 1..256). span > 1 is a catch-up extend: after a switch the model taking over
feeds the few tokens it missed (R-Stitch's runs are short, so these are as frequent as switches) and decides
the next one; graphs at spans EXTEND_SPANS and rows EXTEND_ROWS keep those off the eager path too
(docs/design.md, 'CUDA graphs per batch bucket'). A step qualifies when every row decides exactly one token
from its last new token, with none of the optional parts (top-k/top-p cutoffs, router, sampled-draft storage,
verification); others run eagerly. Rows and tokens past the live ones are padded (engine/plan.py:
HostPlan.pad). With `emulate=True` (the CPU) a "graph" is the same static-shape call, so the padding logic is
tested without a GPU.
"""
from __future__ import annotations

import numpy as np
import torch

from .model_runner import ModelRunner, StepFlags
from .plan import HostPlan

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
EXTEND_SPANS = (2, 4, 8, 16)
EXTEND_ROWS = (1, 2, 4, 8, 16)


class StepGraphs:
    def __init__(self, runner: ModelRunner, max_rows: int, max_tokens: int, pool=None, emulate: bool = False):
        self.runner, self.emulate = runner, emulate
        self.keys = [(b, 1) for b in BUCKETS if b <= max_rows] + \
                    [(b, s) for s in EXTEND_SPANS for b in EXTEND_ROWS if b <= max_rows and b * s <= max_tokens]
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        if not emulate:
            self._capture(pool)

    def _static_step(self, key: tuple[int, int]) -> None:
        rows, span = key
        self.runner.compute(rows * span, rows, rows, span, StepFlags())

    def _capture(self, pool) -> None:
        runner = self.runner
        host = HostPlan(runner.sched, pin=True)
        stream = torch.cuda.Stream()
        for key in sorted(self.keys, key=lambda k: k[0] * k[1], reverse=True):  # largest first: reuse memory
            host.pad(0, *key, runner.num_slots)
            runner.plan.load(host)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: Triton compiles and autotunes outside the capture
                    self._static_step(key)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._static_step(key)
            self.graphs[key] = graph
        torch.cuda.synchronize()

    def key(self, host: HostPlan) -> tuple[int, int] | None:
        """The smallest captured (rows, span) for this plan, or None when it must run eagerly."""
        R, f = host.count("num_rows"), StepFlags.of(host)
        if host.count("num_logits") != R or f.top_k_top_p or f.router or f.sampled_drafts or f.verify:
            return None
        longest = host.count("max_query_len")
        if longest > 1:
            # each row must decide from its last new token (host memory: no device read)
            ends = host.views.query_start_loc[1:R + 1] - 1
            if not np.array_equal(host.views.logits_indices[:R], ends):
                return None
        return next(((b, s) for b, s in self.keys if b >= R and s >= longest and (s == 1) == (longest == 1)),
                    None)

    def replay(self, key: tuple[int, int]) -> None:
        if self.emulate:
            self._static_step(key)
        else:
            self.graphs[key].replay()
