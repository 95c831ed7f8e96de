"""Plan buffers: what the C++ scheduler writes for one model and one step, on the host and on the device.

The layout comes from the scheduler itself (`Scheduler.layout()`), so it is defined once, in C++. Host
buffers are pinned so the copy to the device is asynchronous; device buffers have fixed addresses so CUDA
graphs can read them.
"""
from __future__ import annotations

import numpy as np
import torch

from rstitch_engine import _C


class PlanViews:
    """Named views into one int32 and one float32 buffer (torch tensors on the device, numpy arrays on the
    host: numpy's small-slice writes cost a fraction of torch's per-op dispatch)."""

    def __init__(self, i32, f32, layout):
        for name, kind, offset, length in layout:
            buf = i32 if kind == "i" else f32
            setattr(self, name, buf[offset:offset + length])
        self.router_features = self.router_features.reshape(-1, _C.ROUTER_FEATURES)


class HostPlan:
    """One model's pinned host plan; `header` is a numpy view the host reads without touching the device."""

    def __init__(self, sched: _C.Scheduler, pin: bool):
        self.i32 = torch.zeros(sched.i32_size, dtype=torch.int32, pin_memory=pin)
        self.f32 = torch.zeros(sched.f32_size, dtype=torch.float32, pin_memory=pin)
        self.i32_np, self.f32_np = self.i32.numpy(), self.f32.numpy()
        self.views = PlanViews(self.i32_np, self.f32_np, sched.layout())
        self.header = self.views.header

    def count(self, name: str) -> int:
        return int(self.header[_C.HEADER[name]])

    def pad(self, rows: int, bucket: int, span: int, sink_slot: int) -> None:
        """Rewrites a plan of `rows` rows that each decide one token (a decode: 1 new token; a catch-up
        extend: up to `span`) into the static shape of a graph captured at (`bucket` rows, `span` tokens per
        row): row r owns tokens [r * span, (r + 1) * span), its real tokens last, so that the attention,
        which places a row's new tokens just before its seq_len, sees them where they are. Padding tokens
        and rows [rows, bucket) write no KV (slot -1), have an empty context and send their outputs to the
        sink sequence slot."""
        v = self.views
        starts = v.query_start_loc[:rows + 1].astype(np.int64)
        n_new = np.diff(starts)
        num_tokens = int(starts[-1])
        if rows == bucket and num_tokens == rows * span:
            return
        offset = np.arange(num_tokens) - np.repeat(starts[:-1], n_new)
        dest = np.repeat(np.arange(rows) * span + span - n_new, n_new) + offset
        for name, value in (("input_ids", 0), ("token_index", -1), ("positions", 0), ("slot_mapping", -1)):
            field = getattr(v, name)
            real = field[:num_tokens].copy()
            field[:bucket * span] = value
            field[dest] = real
        v.query_start_loc[:bucket + 1] = np.arange(bucket + 1, dtype=np.int32) * span
        v.logits_indices[:bucket] = np.arange(bucket, dtype=np.int32) * span + span - 1
        pad = slice(rows, bucket)
        for name, value in (("seq_lens", 0), ("seq_slot", sink_slot), ("out_slot", sink_slot), ("out_pos", -1),
                            ("sample_pos", 0), ("seed", 0), ("top_k", 0), ("spec_index", -1),
                            ("verify_start", -1), ("use_router", 0), ("temperature", 0.0), ("top_p", 1.0),
                            ("tau_up", 0.0), ("tau_down", 0.0)):
            getattr(v, name)[pad] = value


class DevicePlan:
    def __init__(self, sched: _C.Scheduler, device):
        self.i32 = torch.zeros(sched.i32_size, dtype=torch.int32, device=device)
        self.f32 = torch.zeros(sched.f32_size, dtype=torch.float32, device=device)
        self.views = PlanViews(self.i32, self.f32, sched.layout())

    def load(self, host: HostPlan) -> None:
        self.i32.copy_(host.i32, non_blocking=True)
        self.f32.copy_(host.f32, non_blocking=True)
