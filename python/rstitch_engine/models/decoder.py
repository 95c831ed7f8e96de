"""The decoder of Qwen2, Llama and Qwen3: one function over plain weight tensors.

The families differ only in two switches of ModelConfig: a bias on the packed q/k/v projection (Qwen2) and a
per-head RMSNorm on q and k before rotary (Qwen3). Tokens of all rows are flattened into one [T, hidden]
batch; attention reads and writes the paged KV cache through `meta` (see engine/ops.py), so the same forward
serves prefill, catch-up extends and decode steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor                 # [q_size + 2 * kv_size, hidden]
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None       # [head_dim]
    k_norm: torch.Tensor | None
    o_proj: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor             # [2 * intermediate, hidden]
    down: torch.Tensor


@dataclass
class ModelWeights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor             # the embedding itself when tied


def forward(cfg: ModelConfig, w: ModelWeights, ops, h: torch.Tensor, positions: torch.Tensor,
            kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta, cos_sin: torch.Tensor,
            logits_rows: torch.Tensor | None = None, nonfinite=None, all_reduce=None) -> torch.Tensor:
    """h [T, hidden]: the tokens' embeddings -> hidden states after the final norm, of the rows `logits_rows`
    only ([L, hidden], gathered by the norm) or of all T. K/V of the new tokens are stored at meta.slot_mapping.

    `nonfinite` ((token_slot, nonfinite_slots), optional): every layer's rope + KV-store op marks the sequence
    slots whose q/k/v held a NaN or an inf (rstitch_kernels/rope_store.py), so that NaN is detected whatever an
    attention backend makes of a NaN query or key (torch's CPU SDPA and the reference's nan_to_num return
    zeros, which would keep the logits finite); a NaN after the last attention reaches the logits, which the
    stitch step checks.

    `all_reduce` (tensor parallelism: `cfg` and `w` are one rank's shard, ModelConfig.shard and load_weights'
    `shard`): sums o_proj's and down's partial outputs over the ranks in place, the two collectives per layer.

    Per layer: norm + qkv, (q/k norm,) rope + KV store, attention, o_proj, norm + gate_up, SwiGLU + down.
    NOTE: o_proj and down outputs join the residual stream where it is next normalised (post-attention
    norm, next layer's input norm, final norm), rounded as the references round: the unfused path (large
    batches) keeps its add-in-norm kernels, and the fused path reads the two parts in its prologue."""
    T, eps, D = h.shape[0], cfg.rms_norm_eps, cfg.head_dim
    residual = None
    for lw, (k_cache, v_cache) in zip(w.layers, kv_caches):
        qkv, residual = ops.norm_linear(h, residual, lw.input_norm, lw.qkv, lw.qkv_bias, eps)
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        if cfg.qk_norm:
            q = ops.rms_norm(q.reshape(-1, D), lw.q_norm, eps)
            k = ops.rms_norm(k.reshape(-1, D), lw.k_norm, eps)
        q = ops.rope_store(q.reshape(T, cfg.num_heads, D), k.reshape(T, cfg.num_kv_heads, D),
                           v.reshape(T, cfg.num_kv_heads, D), positions, cos_sin, k_cache, v_cache, meta.slot_mapping,
                           nonfinite=nonfinite)
        o = ops.attention(q, k_cache, v_cache, meta)
        h = ops.linear(o.reshape(T, cfg.q_size), lw.o_proj)
        if all_reduce is not None:
            all_reduce(h)
        gate_up, residual = ops.norm_linear(h, residual, lw.post_norm, lw.gate_up, None, eps)
        h = ops.silu_mul_linear(gate_up, lw.down)
        if all_reduce is not None:
            all_reduce(h)
    if logits_rows is None:
        logits_rows = torch.arange(T, device=h.device)
    return ops.final_norm(h, w.norm, eps, residual, logits_rows)
