"""CUDA graphs of whole decode steps, one per model and batch bucket: embedding, layers, final norm, LM
head and the stitch step, replayed over the fixed-address device plan.

A step qualifies when every row decodes exactly one token and decides it, with none of the optional parts
(top-k/top-p cutoffs, router, sampled-draft storage, verification); others run eagerly. Rows past the
live ones are padded (engine/plan.py: HostPlan.pad_decode). With `emulate=True` (the CPU) a "graph" is
the same static-shape call, so the padding logic is tested without a GPU.
"""
from __future__ import annotations

import torch

from .model_runner import ModelRunner, StepFlags
from .plan import HostPlan

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_rows: int, pool=None, emulate: bool = False):
        self.runner, self.emulate = runner, emulate
        self.buckets = [b for b in BUCKETS if b <= max_rows]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if not emulate:
            self._capture(pool)

    def _static_step(self, bucket: int) -> None:
        self.runner.compute(bucket, bucket, bucket, 1, StepFlags())

    def _capture(self, pool) -> None:
        runner = self.runner
        host = HostPlan(runner.sched, pin=True)
        stream = torch.cuda.Stream()
        for bucket in sorted(self.buckets, reverse=True):  # largest first: the rest reuse its memory
            host.pad_decode(0, bucket, runner.num_slots)
            runner.plan.load(host)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: Triton compiles and autotunes outside the capture
                    self._static_step(bucket)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._static_step(bucket)
            self.graphs[bucket] = graph
        torch.cuda.synchronize()

    def bucket(self, host: HostPlan) -> int | None:
        """The smallest captured bucket for this plan, or None when it must run eagerly."""
        R, f = host.count("num_rows"), StepFlags.of(host)
        if host.count("max_query_len") != 1 or host.count("num_logits") != R or \
                f.top_k_top_p or f.router or f.sampled_drafts or f.verify:
            return None
        return next((b for b in self.buckets if b >= R), None)

    def replay(self, bucket: int) -> None:
        if self.emulate:
            self._static_step(bucket)
        else:
            self.graphs[bucket].replay()
