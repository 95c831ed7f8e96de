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

    def pad_decode(self, rows: int, bucket: int, sink_slot: int) -> None:
        """Turns rows [rows, bucket) into harmless decode rows for a graph captured at `bucket`: no KV
        write (slot -1), empty context, outputs sent to the sink sequence slot."""
        if rows == bucket:
            return
        v, pad = self.views, slice(rows, bucket)
        for name, value in (("input_ids", 0), ("token_index", -1), ("positions", 0), ("slot_mapping", -1),
                            ("seq_lens", 0), ("seq_slot", sink_slot), ("out_slot", sink_slot), ("out_pos", -1),
                            ("sample_pos", 0), ("seed", 0), ("top_k", 0), ("spec_index", -1),
                            ("verify_start", -1), ("use_router", 0), ("temperature", 0.0), ("top_p", 1.0),
                            ("tau_up", 0.0), ("tau_down", 0.0)):
            getattr(v, name)[pad] = value
        v.logits_indices[pad] = np.arange(rows, bucket, dtype=np.int32)
        v.query_start_loc[rows + 1:bucket + 1] = np.arange(rows + 1, bucket + 1, dtype=np.int32)


class DevicePlan:
    def __init__(self, sched: _C.Scheduler, device):
        self.i32 = torch.zeros(sched.i32_size, dtype=torch.int32, device=device)
        self.f32 = torch.zeros(sched.f32_size, dtype=torch.float32, device=device)
        self.views = PlanViews(self.i32, self.f32, sched.layout())

    def load(self, host: HostPlan) -> None:
        self.i32.copy_(host.i32, non_blocking=True)
        self.f32.copy_(host.f32, non_blocking=True)
