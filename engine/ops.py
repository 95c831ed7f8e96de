"""The device ops the model and the step use, from one of two implementations of the same signatures:
Triton kernels (CUDA, or the CPU interpreter under TRITON_INTERPRET=1) or their plain torch references
(the CPU path CI runs). The runtime above this never branches on the implementation."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rstitch_engine import kernels as K
from rstitch_engine.kernels.fused_linear import unfused_norm_linear, unfused_silu_mul_linear

# Rows up to which the Triton path uses the fused skinny-GEMM kernels (rstitch_kernels/fused_linear.py) instead
# of cuBLAS plus separate norm/activation kernels. To be tuned on the GPU: bench/kernel_micro.py times both.
FUSED_MAX_ROWS = 8
# Rows up to which float32 products on the CPU run as weight @ x^T (bench/results/switch-costs-*-2026-12-01).
SKINNY_MAX_ROWS = 16
# Rows from which bfloat16/float16 products on the CPU run in float32 over WEIGHT_CHUNK-row slices of the
# weight, each converted while it is in cache (measured on the 2-core x86 VM, 2 threads, 2026-12-03, the
# 1.5B's 8960 x 1536 MLP weight: torch's bf16 GEMM, without bf16 units on AVX2, costs 3.6 ms a row, 29 ms
# for 16 rows and 250 ms for 128; the chunked float32 product 12 ms up to 8 rows, 8.6 ms for 16, 30 for 128).
HALF_CHUNKED_MIN_ROWS = 8
WEIGHT_CHUNK = 256


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except on the CPU for the row counts where torch's own choice is slow: 2..SKINNY_MAX_ROWS
    float32 rows as weight @ x^T (torch's x @ W^T leaves its one-row GEMV for a GEMM that streams the weights
    at half the speed: a 2-token catch-up cost 2x a decode, now ~1.1x), and HALF_CHUNKED_MIN_ROWS or more
    half-precision rows in float32 over weight chunks (above), rounded back to x's dtype."""
    if x.device.type != "cpu":
        return F.linear(x, weight, bias)
    rows = x.shape[0]
    if x.dtype == torch.float32 and 2 <= rows <= SKINNY_MAX_ROWS:
        y = torch.mm(weight, x.t()).t().contiguous()
        return y if bias is None else y.add_(bias)
    if x.dtype in (torch.bfloat16, torch.float16) and rows >= HALF_CHUNKED_MIN_ROWS:
        xt = x.float().t().contiguous()
        out = torch.empty(weight.shape[0], rows, dtype=torch.float32)
        for start in range(0, weight.shape[0], WEIGHT_CHUNK):
            torch.mm(weight[start:start + WEIGHT_CHUNK].float(), xt, out=out[start:start + WEIGHT_CHUNK])
        y = out.t()
        return (y if bias is None else y + bias.float()).to(x.dtype).contiguous()
    return F.linear(x, weight, bias)


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

    @classmethod
    def one_sequence(cls, slot_mapping: torch.Tensor, block_table: torch.Tensor, seq_len: int,
                     scale: float) -> "AttentionMeta":
        """One sequence (row 0 of `block_table`) whose len(slot_mapping) new tokens end its `seq_len`."""
        n = slot_mapping.shape[0]
        i32 = dict(dtype=torch.int32, device=slot_mapping.device)
        return cls(slot_mapping=slot_mapping, block_tables=block_table, seq_slot=torch.zeros(1, **i32),
                   query_start_loc=torch.tensor([0, n], **i32), seq_lens=torch.tensor([seq_len], **i32),
                   max_query_len=n, scale=scale)


class Ops:
    def __init__(self, triton: bool):
        self.triton = triton
        suffix = "" if triton else "_ref"
        pick = lambda name: getattr(K, name + suffix)  # noqa: E731
        self.embed_tokens = pick("embed_tokens")
        self.rms_norm = pick("rms_norm")
        self.final_norm = pick("rms_norm_rows")
        self._decode = pick("paged_decode_attention")
        self._extend = pick("paged_extend_attention")
        self.silu_and_mul = pick("silu_and_mul")
        self.stitch_step = pick("stitch_step")
        self.sampling_cutoff = K.sampling_cutoff
        # NOTE: rope + KV store is one program per token at any T, so the Triton path always fuses it.
        self.rope_store = pick("rope_store")

    def _fused(self, x: torch.Tensor) -> bool:
        """Fused skinny GEMM or the unfused composition, from the row count (a host-known shape)."""
        return self.triton and x.shape[0] <= FUSED_MAX_ROWS

    def norm_linear(self, h, residual, norm_weight, weight, bias, eps: float):
        """(rms_norm(h + residual) @ weight^T + bias, h + residual); see rstitch_kernels/fused_linear.py."""
        if self._fused(h):
            return K.norm_linear(h, residual, norm_weight, weight, bias, eps)
        return unfused_norm_linear(self.rms_norm, h, residual, norm_weight, weight, bias, eps, cpu_linear)

    def linear(self, x, weight):
        """x @ weight^T."""
        return K.linear(x, weight) if self._fused(x) else cpu_linear(x, weight)

    def silu_mul_linear(self, gate_up, weight):
        """(silu(gate) * up) @ weight^T for gate_up = [gate | up]."""
        if self._fused(gate_up):
            return K.silu_mul_linear(gate_up, weight)
        return unfused_silu_mul_linear(self.silu_and_mul, gate_up, weight, cpu_linear)

    def lm_head(self, hidden, weight):
        """The output head on the deciding rows: a linear like the others (the skinny GEMV up to
        FUSED_MAX_ROWS rows on the Triton path)."""
        return self.linear(hidden, weight)

    def attention(self, q, k_cache, v_cache, meta: AttentionMeta) -> torch.Tensor:
        if meta.max_query_len == 1:
            return self._decode(q, k_cache, v_cache, meta.block_tables, meta.seq_slot, meta.seq_lens, meta.scale)
        return self._extend(q, k_cache, v_cache, meta.block_tables, meta.seq_slot, meta.query_start_loc,
                            meta.seq_lens, meta.scale, meta.max_query_len)
