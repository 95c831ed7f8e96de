"""The two paged KV pools: per model, per layer, K and V as [num_blocks, block_size, kv_heads, head_dim].

Both pools have the same number of blocks (one block table addresses both), each in its model's shape and
dtype, so they hold the same number of tokens.
"""
from __future__ import annotations

import torch

from rstitch_engine.config import ModelConfig


def num_blocks_for_budget(budget_bytes: int, block_size: int, configs: list[ModelConfig], dtype: torch.dtype) -> int:
    per_token = sum(c.kv_bytes_per_token(dtype) for c in configs)
    return int(budget_bytes // (block_size * per_token))


class KVPool:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device):
        self.block_size = block_size
        shape = (cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        # NOTE: zeroed, not empty: attention kernels load whole blocks, and 0 * NaN from stale memory in a
        # masked lane would still poison a row.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.layers = [(self.k[i], self.v[i]) for i in range(cfg.num_layers)]
