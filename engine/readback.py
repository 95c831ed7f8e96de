"""Step results on their way back to the host, read one step late.

On CUDA the device-to-host copy runs on a side stream into pinned memory and an event marks its end; the
host waits on that event only when it commits the step, by which time the next step is already queued. On
the CPU the copy is immediate and the wait a no-op: the same code path runs everywhere.
"""
from __future__ import annotations

import time

import torch


class StepResults:
    """Pinned host copies of one model's (tokens, entropies, flags) for one step, plus its timing."""

    def __init__(self, capacity: int, device: torch.device):
        pin = device.type == "cuda"
        self.tokens = torch.zeros(capacity, dtype=torch.int32, pin_memory=pin)
        self.entropies = torch.zeros(capacity, dtype=torch.float32, pin_memory=pin)
        self.flags = torch.zeros(capacity, dtype=torch.int32, pin_memory=pin)
        self.numpy = (self.tokens.numpy(), self.entropies.numpy(), self.flags.numpy())
        self.cuda = device.type == "cuda"
        self.start = self.stop = self.copied = None
        self.wall = 0.0

    def begin(self) -> None:
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.wall = time.perf_counter()

    def fetch(self, tokens, entropies, flags, copy_stream) -> None:
        """Queues the copy of the device outputs (the first n rows) into this pinned buffer."""
        n = tokens.shape[0]
        if not self.cuda:
            self.wall = time.perf_counter() - self.wall
            self.tokens[:n].copy_(tokens)
            self.entropies[:n].copy_(entropies)
            self.flags[:n].copy_(flags)
            return
        self.stop = torch.cuda.Event(enable_timing=True)
        self.stop.record()
        copy_stream.wait_event(self.stop)
        with torch.cuda.stream(copy_stream):
            self.tokens[:n].copy_(tokens, non_blocking=True)
            self.entropies[:n].copy_(entropies, non_blocking=True)
            self.flags[:n].copy_(flags, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()
        # NOTE: the device buffers are rewritten by the next step on the main stream; it must not start
        # before this copy has read them.
        torch.cuda.current_stream().wait_event(self.copied)

    def wait(self) -> float:
        """Blocks until the results are on the host; returns the model's device time for the step (s)."""
        if not self.cuda:
            return self.wall
        # NOTE: the one intended host wait of the loop: by now the next step is queued, so the device
        # does not idle while the host commits this one.
        self.copied.synchronize()
        return self.start.elapsed_time(self.stop) / 1e3
