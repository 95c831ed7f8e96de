"""The device ops the model and the step use, from one of two implementations of the same signatures:
Triton kernels (CUDA, or the CPU interpreter under TRITON_INTERPRET=1) or their plain torch references
(the CPU path CI runs). The runtime above this never branches on the implementation."""
from __future__ import annotations

import functools
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
# Half-precision (bf16/fp16) products on a CPU where oneDNN has no support for that type (bf16: AVX2
# without AVX-512) cost a weight pass per row in torch's GEMM; there, from HALF_CHUNKED_MIN_ROWS rows, they run in
# float32 over slices of WEIGHT_CHUNK weight elements, each converted into one reused buffer while it is in
# cache, as x @ slice^T below HALF_TRANSPOSED_MIN_ROWS rows and slice @ x^T from there, with x's rows padded by
# zeros to a multiple of HALF_TRANSPOSED_ROW_MULTIPLE (torch's float32 GEMM is much slower for other widths in
# that orientation). Measured on the 2-core x86 VM, 2 threads, 2026-12-03, the 1.5B's 8960 x 1536 MLP weight:
# torch's bf16 GEMM 2.1 / 3.8 / 7.2 / 14.2 / 28.3 ms at 1 / 2 / 4 / 8 / 16 rows; chunked 3.3 / 4.5 / 6.4 / 7.0 /
# 6.6 ms (the conversion is the fixed ~3 ms); the same break-even for the 1536 x 8960, attention and
# 151936-row head shapes; slices of 256 x 1536 or 128 x 1536 elements were 5-15% slower. The whole 1.5B's
# decode step (bf16, same VM) at 9 / 10 / 11 / 15 / 31 rows: 895 / 900 / 900 / 1215 / 2160 ms unpadded, 778 /
# 778 / 778 / 921 / 1205 padded, 8 rows 841 ms as x @ slice^T against ~917 padded to 16. Where oneDNN supports
# the type, torch's GEMM is kept.
HALF_CHUNKED_MIN_ROWS = 3
HALF_TRANSPOSED_MIN_ROWS = 9
HALF_TRANSPOSED_ROW_MULTIPLE = 8
WEIGHT_CHUNK = 512 * 1536


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
    if x.dtype in (torch.bfloat16, torch.float16) and rows >= HALF_CHUNKED_MIN_ROWS and _slow_half_gemm(x.dtype):
        return _chunked_half_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def cpu_product_bounds(dtype: torch.dtype) -> tuple[int, ...]:
    """The row counts from which cpu_linear changes algorithm for this dtype on this CPU, in order (a step's
    cost is a different line in each range: evaluation/step_cost.py)."""
    if dtype == torch.float32:
        return 2, SKINNY_MAX_ROWS + 1
    if dtype in (torch.bfloat16, torch.float16) and _slow_half_gemm(dtype):
        return HALF_CHUNKED_MIN_ROWS, HALF_TRANSPOSED_MIN_ROWS
    return ()


@functools.cache
def _slow_half_gemm(dtype: torch.dtype) -> bool:
    name = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
    try:
        return not getattr(torch.ops.mkldnn, name)()
    except (AttributeError, RuntimeError):  # a torch without the private probe: keep its own GEMM, always right
        return False


def _chunked_half_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out_features, in_features = weight.shape
    rows, chunk = x.shape[0], max(16, WEIGHT_CHUNK // in_features)
    # one buffer for every weight slice: a fresh float32 tensor per slice costs more than its product here
    buffer = torch.empty(min(chunk, out_features), in_features, dtype=torch.float32)
    if rows >= HALF_TRANSPOSED_MIN_ROWS:
        width = -(-rows // HALF_TRANSPOSED_ROW_MULTIPLE) * HALF_TRANSPOSED_ROW_MULTIPLE
        xf = torch.zeros(in_features, width, dtype=torch.float32)
        xf[:, :rows] = x.t()
        out = torch.empty(out_features, width, dtype=torch.float32)
        product = lambda start, stop, piece: torch.mm(piece, xf, out=out[start:stop])  # noqa: E731
    else:
        xf = x.float()
        out = torch.empty(rows, out_features, dtype=torch.float32)
        product = lambda start, stop, piece: out[:, start:stop].copy_(torch.mm(xf, piece.t()))  # noqa: E731
    for start in range(0, out_features, chunk):
        stop = min(start + chunk, out_features)
        piece = buffer[:stop - start]
        piece.copy_(weight[start:stop])
        product(start, stop, piece)
    y = out[:, :rows].t() if rows >= HALF_TRANSPOSED_MIN_ROWS else out
    return (y if bias is None else y + bias.float()).to(x.dtype).contiguous()


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
