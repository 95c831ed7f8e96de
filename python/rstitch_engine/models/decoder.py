"""The decoder of Qwen2, Llama and Qwen3: one function over plain weight tensors.

The families differ only in two switches of ModelConfig: a bias on the packed q/k/v projection (Qwen2) and a
per-head RMSNorm on q and k before rotary (Qwen3). Tokens of all rows are flattened into one [T, hidden]
batch; attention reads and writes the paged KV cache through `meta` (see engine/ops.py), so the same forward
serves prefill, catch-up extends and decode steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


def forward(cfg: ModelConfig, w: ModelWeights, ops, input_ids: torch.Tensor, positions: torch.Tensor,
            kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta, cos_sin: torch.Tensor) -> torch.Tensor:
    """Hidden states after the final norm, [T, hidden]; K/V of the new tokens are stored at meta.slot_mapping."""
    T, eps, D = input_ids.shape[0], cfg.rms_norm_eps, cfg.head_dim
    h = F.embedding(input_ids, w.embed)
    residual = None
    for lw, (k_cache, v_cache) in zip(w.layers, kv_caches):
        if residual is None:
            residual, x = h, ops.rms_norm(h, lw.input_norm, eps)
        else:
            x, residual = ops.rms_norm(h, lw.input_norm, eps, residual)
        q, k, v = F.linear(x, lw.qkv, lw.qkv_bias).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        if cfg.qk_norm:
            q = ops.rms_norm(q.reshape(-1, D), lw.q_norm, eps)
            k = ops.rms_norm(k.reshape(-1, D), lw.k_norm, eps)
        q = q.reshape(T, cfg.num_heads, D)
        k = k.reshape(T, cfg.num_kv_heads, D)
        v = v.reshape(T, cfg.num_kv_heads, D)
        q, k = ops.rotary(q, k, positions, cos_sin)
        ops.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        o = ops.attention(q, k_cache, v_cache, meta)
        h = F.linear(o.reshape(T, cfg.q_size), lw.o_proj)
        x, residual = ops.rms_norm(h, lw.post_norm, eps, residual)
        h = F.linear(ops.silu_and_mul(F.linear(x, lw.gate_up)), lw.down)
    out, _ = ops.rms_norm(h, w.norm, eps, residual)
    return out


def lm_head(w: ModelWeights, hidden: torch.Tensor) -> torch.Tensor:
    return F.linear(hidden, w.lm_head)
