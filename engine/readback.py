"""Step results on their way back to the host, read one step late.

A model's results (token, entropy and flags per logits row) sit in one device buffer (`ModelRunner.results`),
so they come back in one copy, queued on the step's own stream right after the step: the next step, queued
behind it, cannot overwrite them early, and no second stream has to be waited on. On CUDA the copy lands in
pinned memory and an event marks its end; the host waits on that event only when it commits the step, by
which time the next step is already queued. On the CPU the copy is immediate and the wait a no-op: the same
code path runs everywhere.
"""
from __future__ import annotations

import time

import numpy as np
import torch


def result_views(results: torch.Tensor, capacity: int):
    """(tokens, entropies, flags) views of a packed [3 * capacity] int32 buffer (torch or numpy)."""
    tokens, entropies, flags = results[:capacity], results[capacity:2 * capacity], results[2 * capacity:]
    return tokens, entropies.view(torch.float32 if isinstance(results, torch.Tensor) else np.float32), flags


class StepResults:
    """The pinned host copy of one model's packed results for one step, plus its timing."""

    def __init__(self, capacity: int, device: torch.device):
        self.cuda = device.type == "cuda"
        self.capacity = capacity
        self.host = torch.zeros(3 * capacity, dtype=torch.int32, pin_memory=self.cuda)
        self.numpy = result_views(self.host.numpy(), capacity)
        self.start = self.stop = self.copied = None  # CUDA events
        self.order = None
        self.started = self.seconds = 0.0  # the CPU's wall clock: when the step began, how long it took

    def begin(self) -> None:
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.started = time.perf_counter()

    def fetch(self, results: torch.Tensor, n: int, order: np.ndarray | None = None) -> None:
        """Queues the copy of the first n rows of the packed device results (with the unused tails of the
        first two fields: one contiguous copy); `order` (from ModelRunner.run) puts them back in plan order."""
        self.order = order
        used = slice(0, 2 * self.capacity + n)
        if not self.cuda:
            self.seconds = time.perf_counter() - self.started
            self.host[used].copy_(results[used])
            return
        self.stop = torch.cuda.Event(enable_timing=True)
        self.stop.record()
        self.host[used].copy_(results[used], non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()

    def wait(self) -> float:
        """Blocks until the results are on the host, in plan order; returns the model's device time for the
        step (s)."""
        if self.cuda:
            # NOTE: the one intended host wait of the loop: by now the next step is queued, so the device
            # does not idle while the host commits this one.
            self.copied.synchronize()
        if self.order is not None:
            for field in self.numpy:
                field[:len(self.order)] = field[self.order]
        return self.start.elapsed_time(self.stop) / 1e3 if self.cuda else self.seconds
