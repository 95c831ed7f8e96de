"""CUDA graphs of whole steps, per model and (rows, span, variant) key: embedding, layers, final norm, LM head
and the stitch step, replayed over the fixed-address device plan.

span 1 is a decode step (rows 1..256). span > 1 is a catch-up extend: after a switch the model taking over
feeds the few tokens it missed (R-Stitch's runs are short, so these are as frequent as switches) and decides
the next one; graphs at spans EXTEND_SPANS and rows EXTEND_ROWS keep those off the eager path too
(docs/design.md, 'CUDA graphs per batch bucket'). The variant is the step's optional parts (StepFlags:
top-k/top-p cutoffs, the R-Stitch+ router, sampled-draft storage, verification of speculative drafts): plain
steps are captured at construction, each other variant lazily, the first time a step needs it (a capture over
a plan of padding rows only, so it touches no request's state). A step qualifies when every row decides one
token from its last new token, or, verifying, when every token has a logits row; mixed steps, a router that
records its decisions for training, and longer steps run eagerly. Rows and tokens past the live ones are
padded (engine/plan.py: HostPlan.pad). With `emulate=True` (the CPU) a "graph" is the same static-shape call,
so the padding logic and the variants are tested without a GPU.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .model_runner import ModelRunner, StepFlags
from .plan import HostPlan

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
EXTEND_SPANS = (2, 4, 8, 16)
EXTEND_ROWS = (1, 2, 4, 8, 16)


class StepGraphs:
    def __init__(self, runner: ModelRunner, pool=None, emulate: bool = False):
        self.runner, self.emulate, self.pool = runner, emulate, pool
        max_rows, max_tokens = runner.layout.max_rows, runner.layout.max_step_tokens
        self.shapes = [(b, 1) for b in BUCKETS if b <= max_rows] + \
                      [(b, s) for s in EXTEND_SPANS for b in EXTEND_ROWS if b <= max_rows and b * s <= max_tokens]
        # key -> (the CUDA graph, None when emulated; the draft-logits buffer it writes, if any)
        self.graphs: dict[tuple[int, int, StepFlags], tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None]] = {}
        self._padding_plan = HostPlan(runner.layout, pin=not emulate)
        for rows, span in sorted(self.shapes, key=lambda s: s[0] * s[1], reverse=True):  # largest first: reuse memory
            self.ensure((rows, span, StepFlags()), None)

    def _static_step(self, key: tuple[int, int, StepFlags], draft_logits: torch.Tensor | None) -> None:
        rows, span, flags = key
        self.runner.compute(rows * span, rows, rows * span if flags.verify else rows, span, flags, draft_logits)

    def ensure(self, key: tuple[int, int, StepFlags], draft_logits: torch.Tensor | None) -> None:
        """Captures the graph of `key` unless it exists. A capture replaces the device plan with one of padding
        rows only: the caller loads its plan after this."""
        if key in self.graphs:
            return
        if self.emulate:
            self.graphs[key] = (None, draft_logits)
            return
        runner = self.runner
        self._padding_plan.pad(0, key[0], key[1], runner.num_slots, every_token=key[2].verify)
        runner.plan.load(self._padding_plan)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: Triton compiles and autotunes outside the capture
                self._static_step(key, draft_logits)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # NOTE: torch.cuda.graph synchronizes the device: a lazy capture costs one host wait, once per key.
        with torch.cuda.graph(graph, pool=self.pool):
            self._static_step(key, draft_logits)
        self.graphs[key] = (graph, draft_logits)

    def forget(self, uses) -> None:
        """Drops the graphs whose variant `uses(flags)` is true (their router or draft buffer was replaced)."""
        for key in [k for k in self.graphs if uses(k[2])]:
            del self.graphs[key]

    def key(self, host: HostPlan) -> tuple[int, int, StepFlags] | None:
        """The smallest (rows, span, variant) for this plan, or None when it must run eagerly."""
        R, T, L, f = host.count("num_rows"), host.count("num_tokens"), host.count("num_logits"), StepFlags.of(host)
        if f.verify:
            if L != T or not np.array_equal(host.views.logits_indices[:L], np.arange(L)):
                return None
            shape = next(((b, s) for b, s in self.shapes if s > 1 and b >= R and s >= host.count("max_query_len")
                          and b * s <= self.runner.logits_capacity), None)
            return None if shape is None else (*shape, f)
        if L != R:
            return None
        router = self.runner.router
        if f.router and (router is None or router.recorder is not None):
            return None  # no router: the eager step raises; a recording router copies decisions to the host
        longest = host.count("max_query_len")
        if longest > 1:
            # each row must decide from its last new token (host memory: no device read)
            ends = host.views.query_start_loc[1:R + 1] - 1
            if not np.array_equal(host.views.logits_indices[:R], ends):
                return None
        shape = next(((b, s) for b, s in self.shapes if b >= R and s >= longest and (s == 1) == (longest == 1)), None)
        # `sampling` changes only verification, which never gets here: one graph for greedy and sampled rows
        return None if shape is None else (*shape, dataclasses.replace(f, sampling=False))

    def replay(self, key: tuple[int, int, StepFlags]) -> None:
        graph, draft_logits = self.graphs[key]
        if self.emulate:
            self._static_step(key, draft_logits)
        else:
            graph.replay()
