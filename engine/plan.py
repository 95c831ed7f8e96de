"""Plan buffers: what the C++ scheduler writes for one model and one step, on the host and on the device.

The layout comes from the scheduler itself (`Scheduler.layout()`), so it is defined once, in C++; the core
copies it into a `PlanLayout`, plain data that workers are built from without a scheduler. The int32 and
float32 fields share one buffer (the float32 part viewed in place), so a step's plan goes up in one copy.
Host buffers are pinned so that copy is asynchronous; device buffers have fixed addresses so CUDA graphs can
read them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rstitch_engine import _C


@dataclass(frozen=True)
class PlanLayout:
    """The sizes of the scheduler's plan and table-update buffers, and its named fields."""
    i32_size: int
    f32_size: int
    fields: tuple              # (name, "i" or "f", offset, length) per field
    max_rows: int              # rows a step can plan
    max_step_tokens: int       # tokens a step can plan
    max_blocks_per_seq: int
    table_update_size: int
    table_update_capacity: int

    @classmethod
    def of(cls, sched: _C.Scheduler, max_step_tokens: int) -> "PlanLayout":
        return cls(sched.i32_size, sched.f32_size, tuple(tuple(f) for f in sched.layout()), sched.max_rows,
                   max_step_tokens, sched.max_blocks_per_seq, sched.table_update_size, sched.table_update_capacity)


class PlanViews:
    """Named views into one int32 and one float32 buffer (torch tensors on the device, numpy arrays on the
    host: numpy's small-slice writes cost a fraction of torch's per-op dispatch)."""

    def __init__(self, i32, f32, fields):
        for name, kind, offset, length in fields:
            buf = i32 if kind == "i" else f32
            setattr(self, name, buf[offset:offset + length])
        self.router_features = self.router_features.reshape(-1, _C.ROUTER_FEATURES)


class HostPlan:
    """One model's pinned host plan; `header` is a numpy view the host reads without touching the device."""

    def __init__(self, layout: PlanLayout, pin: bool):
        self.buffer = torch.zeros(layout.i32_size + layout.f32_size, dtype=torch.int32, pin_memory=pin)
        whole = self.buffer.numpy()
        self.i32_np, self.f32_np = whole[:layout.i32_size], whole[layout.i32_size:].view(np.float32)
        self.views = PlanViews(self.i32_np, self.f32_np, layout.fields)
        self.header = self.views.header

    def count(self, name: str) -> int:
        return int(self.header[_C.HEADER[name]])

    def pad(self, rows: int, bucket: int, span: int, sink_slot: int, every_token: bool = False) -> np.ndarray | None:
        """Rewrites a plan of `rows` rows into the static shape of a graph captured at (`bucket` rows, `span`
        tokens per row): row r owns tokens [r * span, (r + 1) * span), its real tokens last, so that the
        attention, which places a row's new tokens just before its seq_len, sees them where they are. Each
        row decides one token from its last (a decode: 1 new token; a catch-up extend: up to `span`), or,
        with `every_token` (verification: k drafts and the token before them), every token of the row has
        a logits row, which moves with its token. Padding tokens and rows [rows, bucket) write no KV
        (slot -1), have an empty context, verify nothing and send their outputs to the sink sequence slot.
        Returns, with `every_token`, where each logits row went (its results are read back from there)."""
        v = self.views
        starts = v.query_start_loc[:rows + 1].astype(np.int64)
        n_new = np.diff(starts)
        num_tokens = int(starts[-1])
        if rows == bucket and num_tokens == rows * span:
            return np.arange(num_tokens) if every_token else None
        offset = np.arange(num_tokens) - np.repeat(starts[:-1], n_new)
        dest = np.repeat(np.arange(rows) * span + span - n_new, n_new) + offset
        for name, value in (("input_ids", 0), ("token_index", -1), ("positions", 0), ("slot_mapping", -1)):
            _move(getattr(v, name), num_tokens, bucket * span, dest, value)
        v.query_start_loc[:bucket + 1] = np.arange(bucket + 1, dtype=np.int32) * span
        if every_token:
            logits, static_logits, logits_dest = num_tokens, bucket * span, dest
            v.logits_indices[:static_logits] = np.arange(static_logits, dtype=np.int32)
        else:
            logits, static_logits, logits_dest = rows, bucket, np.arange(rows)
            v.logits_indices[:bucket] = np.arange(bucket, dtype=np.int32) * span + span - 1
        for name, value in LOGITS_ROW_PADDING + (("out_slot", sink_slot),):
            _move(getattr(v, name), logits, static_logits, logits_dest, value)
        if every_token:  # a verify group's first logits row moved with its token
            start = v.verify_start[logits_dest]
            v.verify_start[logits_dest] = np.where(start >= 0, logits_dest[np.maximum(start, 0)], -1)
        _move(v.router_features, logits, static_logits, logits_dest, 0.0)
        v.seq_lens[rows:bucket] = 0
        v.seq_slot[rows:bucket] = sink_slot
        return logits_dest if every_token else None


# per logits row: the values of a padding row (and out_slot: the sink slot)
LOGITS_ROW_PADDING = (("out_pos", -1), ("sample_pos", 0), ("seed", 0), ("top_k", 0), ("spec_index", -1),
                      ("verify_start", -1), ("use_router", 0), ("temperature", 0.0), ("top_p", 1.0), ("tau_up", 0.0),
                      ("tau_down", 0.0), ("accept_rate", -1.0))


def _move(field: np.ndarray, n: int, static_n: int, dest: np.ndarray, value) -> None:
    """field[:n] to positions `dest` of field[:static_n], the others set to `value`."""
    real = field[:n].copy()
    field[:static_n] = value
    field[dest] = real


class DevicePlan:
    def __init__(self, layout: PlanLayout, device):
        self.buffer = torch.zeros(layout.i32_size + layout.f32_size, dtype=torch.int32, device=device)
        self.views = PlanViews(self.buffer[:layout.i32_size], self.buffer[layout.i32_size:].view(torch.float32),
                               layout.fields)

    def load(self, host: HostPlan) -> None:
        self.buffer.copy_(host.buffer, non_blocking=True)
