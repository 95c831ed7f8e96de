"""The device ops the model and the step use, from one of two implementations of the same signatures:
Triton kernels (CUDA, or the CPU interpreter under TRITON_INTERPRET=1) or their plain torch references
(the CPU path CI runs). The runtime above this never branches on the implementation."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rstitch_engine import kernels as K


@dataclass
class AttentionMeta:
    """Where a forward's tokens sit in the paged cache (see csrc/plan_layout.h for the fields)."""
    slot_mapping: torch.Tensor     # [T] flat KV slot of each new token
    block_tables: torch.Tensor     # [seq_slots, max_blocks] shared by both models
    seq_slot: torch.Tensor         # [R] row -> sequence slot
    query_start_loc: torch.Tensor  # [R + 1]
    seq_lens: torch.Tensor         # [R] context length after this forward
    max_query_len: int             # 1: every row decodes one token
    scale: float


class Ops:
    def __init__(self, triton: bool):
        self.triton = triton
        suffix = "" if triton else "_ref"
        pick = lambda name: getattr(K, name + suffix)  # noqa: E731
        self.rms_norm = pick("rms_norm")
        self._rotary = pick("apply_rotary")
        self.store_kv = pick("store_kv")
        self._decode = pick("paged_decode_attention")
        self._extend = pick("paged_extend_attention")
        self.silu_and_mul = pick("silu_and_mul")
        self.stitch_step = pick("stitch_step")
        self.sampling_cutoff = K.sampling_cutoff

    def rotary(self, q, k, positions, cos_sin):
        """Rotates in place: q and k may be strided views into the packed qkv projection."""
        self._rotary(q, k, positions, cos_sin)
        return q, k

    def attention(self, q, k_cache, v_cache, meta: AttentionMeta) -> torch.Tensor:
        if meta.max_query_len == 1:
            return self._decode(q, k_cache, v_cache, meta.block_tables, meta.seq_slot, meta.seq_lens, meta.scale)
        return self._extend(q, k_cache, v_cache, meta.block_tables, meta.seq_slot, meta.query_start_loc,
                            meta.seq_lens, meta.scale, meta.max_query_len)
