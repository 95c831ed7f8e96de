"""Triton kernels of the engine, each with a plain-torch reference of the same signature.

The engine binds one set for its whole runtime: `EngineConfig(kernels="triton" | "torch")` (default: Triton
on CUDA, the `*_ref` references on the CPU) becomes `Ops(triton=...)` in engine/ops.py, which takes `name` or
`name_ref` for every op. `use_triton(device)` (common.py) only says whether the Triton launchers can run on a
device (CUDA, or the CPU under TRITON_INTERPRET=1 set before these modules are imported); the engine does not
call it.
"""
from .activation import silu_and_mul, silu_and_mul_ref
from .common import use_triton
from .embedding import embed_tokens, embed_tokens_ref
from .decode_attention import paged_decode_attention, paged_decode_attention_ref
from .extend_attention import paged_extend_attention, paged_extend_attention_ref
from .fused_linear import linear, linear_ref, norm_linear, norm_linear_ref, silu_mul_linear, silu_mul_linear_ref
from .kv_store import store_kv, store_kv_ref
from .norm import rms_norm, rms_norm_ref, rms_norm_rows, rms_norm_rows_ref
from .random import gumbel_noise, hash_u32_torch, uniform_noise
from .rope_store import rope_store, rope_store_ref
from .rotary import apply_rotary, apply_rotary_ref
from .stitch_step import sampling_cutoff, stitch_step, stitch_step_ref

__all__ = [
    "use_triton",
    "stitch_step", "stitch_step_ref", "sampling_cutoff",
    "uniform_noise", "gumbel_noise", "hash_u32_torch",
    "store_kv", "store_kv_ref",
    "paged_decode_attention", "paged_decode_attention_ref",
    "paged_extend_attention", "paged_extend_attention_ref",
    "embed_tokens", "embed_tokens_ref",
    "rms_norm", "rms_norm_ref", "rms_norm_rows", "rms_norm_rows_ref",
    "apply_rotary", "apply_rotary_ref",
    "silu_and_mul", "silu_and_mul_ref",
    "norm_linear", "norm_linear_ref", "linear", "linear_ref", "silu_mul_linear", "silu_mul_linear_ref",
    "rope_store", "rope_store_ref",
]
