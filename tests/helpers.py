"""Test helpers: a model's full-sequence logits through the engine's own forward, and the same from HF; a
checkpoint copy with a NaN embedding row."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rstitch_engine.config import ModelConfig
from rstitch_engine.engine.ops import Ops
from rstitch_engine.engine.sequence import SequenceForward
from rstitch_engine.loader import load_weights


def engine_logits(path, ids: list[int], *, dtype=torch.float32, triton: bool = False, block_size: int = 4,
                  shard: tuple[int, int] = (0, 1), all_reduce=None):
    """[T, V] logits of one prefill of `ids` through the paged forward (blocks deliberately shuffled); with
    `shard` (rank, size) and `all_reduce`, one tensor-parallel rank's part of it."""
    full = ModelConfig.from_dir(path)
    cfg = full.shard(shard[1])
    w = load_weights(path, full, dtype, torch.device("cpu"), shard=shard)
    blocks = -(-len(ids) // block_size)
    shuffled = torch.randperm(blocks + 2, generator=torch.Generator().manual_seed(0))[:blocks]  # 2 spare blocks
    sequence = SequenceForward(cfg, w, Ops(triton), len(ids), block_size=block_size, block_order=shuffled,
                               all_reduce=all_reduce)
    return sequence.logits(torch.tensor(ids)).float()


def hf_model(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def hf_logits(path, ids: list[int], dtype=torch.float32) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(path, dtype)(torch.tensor([ids])).logits[0].float()


def nan_embedding_copy(src: Path, dst: Path, token: int = 77) -> Path:
    """A copy of checkpoint `src` in `dst` whose embedding row `token` is NaN: a request holding that token
    fails in that model."""
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    weights = load_file(dst / "model.safetensors")
    weights["model.embed_tokens.weight"][token] = float("nan")
    save_file(weights, dst / "model.safetensors")
    return dst
