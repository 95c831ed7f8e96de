"""One sequence through a model's forward outside the step loop, in a KV pool of its own: the warm-start
labeller's teacher-forced logits (Worker.teacher_forced_logits), the switch-cost benchmark's timed forwards
(bench/switch_costs.py) and the tests' check of the paged forward against transformers."""
from __future__ import annotations

import torch

from rstitch_engine.config import ModelConfig
from rstitch_engine.models.decoder import ModelWeights, forward
from rstitch_engine.models.rope import cos_sin_table

from .kv_pool import KVPool
from .ops import AttentionMeta, Ops


class SequenceForward:
    """Room for `length` positions of one sequence in blocks of `block_size`, placed in the pool in
    `block_order` (default: in order; tests shuffle it to exercise the paged addressing). `cfg` and `weights`
    are one rank's shard where `all_reduce` joins the ranks (tensor parallelism)."""

    def __init__(self, cfg: ModelConfig, weights: ModelWeights, ops: Ops, length: int, *, block_size: int = 16,
                 block_order: torch.Tensor | None = None, all_reduce=None):
        device = weights.embed.device
        num_blocks = -(-length // block_size)
        self.order = (torch.arange(num_blocks, dtype=torch.int32, device=device) if block_order is None
                      else block_order.to(device=device, dtype=torch.int32))
        self.pool = KVPool(cfg, int(self.order.max()) + 1, block_size, weights.embed.dtype, device)
        self.cfg, self.weights, self.ops, self.block_size, self.all_reduce = cfg, weights, ops, block_size, all_reduce
        self.cos_sin = cos_sin_table(cfg, length, device)

    def logits(self, ids: torch.Tensor, start: int = 0, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The LM head's logits of `rows` (indices into `ids`; default all) after feeding `ids` at positions
        start, start + 1, ... over the KV already in the pool below `start`."""
        n, bs, device = ids.shape[0], self.block_size, self.order.device
        positions = torch.arange(start, start + n, dtype=torch.int32, device=device)
        slots = (self.order[positions.long() // bs] * bs + positions % bs).to(torch.int32)
        meta = AttentionMeta.one_sequence(slots, self.order[None], start + n, self.cfg.head_dim ** -0.5)
        w = self.weights
        hidden = forward(self.cfg, w, self.ops, w.embed[ids.long()], positions, self.pool.layers, meta, self.cos_sin,
                         logits_rows=rows, all_reduce=self.all_reduce)
        return self.ops.lm_head(hidden, w.lm_head)
