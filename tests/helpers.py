"""Test helpers: a model's full-sequence logits through the engine's own forward, and the same from HF."""
from __future__ import annotations

import torch

from rstitch_engine.config import ModelConfig
from rstitch_engine.engine.kv_pool import KVPool
from rstitch_engine.engine.ops import AttentionMeta, Ops
from rstitch_engine.loader import load_weights
from rstitch_engine.models.decoder import forward
from rstitch_engine.models.rope import cos_sin_table


def engine_logits(path, ids: list[int], *, dtype=torch.float32, triton: bool = False, block_size: int = 4,
                  shard: tuple[int, int] = (0, 1), all_reduce=None):
    """[T, V] logits of one prefill of `ids` through the paged forward (blocks deliberately shuffled); with
    `shard` (rank, size) and `all_reduce`, one tensor-parallel rank's part of it."""
    full = ModelConfig.from_dir(path)
    cfg = full.shard(shard[1])
    w = load_weights(path, full, dtype, torch.device("cpu"), shard=shard)
    T = len(ids)
    nb = -(-T // block_size) + 2
    pool = KVPool(cfg, nb, block_size, dtype, "cpu")
    order = torch.randperm(nb, generator=torch.Generator().manual_seed(0)).to(torch.int32)
    slots = (order[torch.arange(T) // block_size] * block_size + torch.arange(T) % block_size).to(torch.int32)
    meta = AttentionMeta.one_sequence(slots, order[None], T, cfg.head_dim ** -0.5)
    ops = Ops(triton)
    hidden = forward(cfg, w, ops, w.embed[torch.tensor(ids)], torch.arange(T, dtype=torch.int32), pool.layers,
                     meta, cos_sin_table(cfg, T), all_reduce=all_reduce)
    return ops.lm_head(hidden, w.lm_head).float()


def hf_model(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def hf_logits(path, ids: list[int], dtype=torch.float32) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(path, dtype)(torch.tensor([ids])).logits[0].float()
