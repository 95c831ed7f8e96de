"""Tensor parallelism, the model level: a rank's shard of the shapes (ModelConfig.shard) and of the weights
(load_weights(shard=...)), and the forward with an all-reduce after o_proj and down, run in spawned gloo
processes (never forked; each test under a timeout, so a hang fails) against the unsharded forward."""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import socket

import pytest
import torch

from helpers import engine_logits
from rstitch_engine.config import ModelConfig

RANK_TIMEOUT_S = 120
IDS = [5, 17, 200, 9, 31, 64, 3, 120, 77, 8, 250, 14, 99]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_logits(rank: int, size: int, port: int, path: str, ids: list[int], out) -> None:
    """One rank: its shard of the weights, the forward with gloo all-reduces; rank 0 sends the logits."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        logits = engine_logits(path, ids, shard=(rank, size), all_reduce=dist.all_reduce)
        if rank == 0:
            out.put(logits)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _sharded_logits(path, size: int) -> torch.Tensor:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    ranks = [ctx.Process(target=_rank_logits, args=(r, size, port, str(path), IDS, out)) for r in range(size)]
    for p in ranks:
        p.start()
    try:
        logits = out.get(timeout=RANK_TIMEOUT_S)
        for p in ranks:
            p.join(RANK_TIMEOUT_S)
            assert p.exitcode == 0, f"rank {ranks.index(p)} exited with {p.exitcode}"
        return logits
    finally:
        for p in ranks:  # a hang or a failure leaves no process behind
            if p.is_alive():
                p.kill()
                p.join()


@pytest.mark.parametrize("arch, kw", [("qwen2", {}),                      # qkv bias, 4 heads / 2 KV heads
                                      ("qwen3", {"kv_heads": 1}),         # q/k norm, 1 KV head replicated
                                      ("llama", {"heads": 8, "kv_heads": 4, "tied": True})])
def test_two_ranks_give_the_unsharded_logits(tiny, arch, kw):
    path = tiny(arch, init_std=0.2, **kw)
    want = engine_logits(path, IDS)
    got = _sharded_logits(path, 2)
    # fp32: the all-reduce only reorders sums, ~1e-6 relative; the argmax must agree everywhere
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_shard_shapes_and_errors(tiny):
    cfg = ModelConfig.from_dir(tiny("qwen2", heads=8, kv_heads=2, intermediate=96))
    two = cfg.shard(2)
    assert (two.num_heads, two.num_kv_heads, two.intermediate_size) == (4, 1, 48)
    four = cfg.shard(4)  # fewer KV heads than ranks: one each, replicated
    assert (four.num_heads, four.num_kv_heads, four.intermediate_size) == (2, 1, 24)
    assert cfg.shard(1) == cfg
    with pytest.raises(ValueError, match="tensor_parallel_size 3 does not divide the model's 8 attention heads"):
        cfg.shard(3)
    with pytest.raises(ValueError, match="tensor_parallel_size 8 does not divide the model's 100 intermediate_size"):
        dataclasses.replace(cfg, intermediate_size=100).shard(8)
    odd = ModelConfig.from_dir(tiny("qwen2", heads=6, kv_heads=3, intermediate=96))
    with pytest.raises(ValueError, match="neither divides the model's 3 KV heads nor is a multiple of them"):
        odd.shard(2)
    with pytest.raises(ValueError, match="must be >= 1"):
        cfg.shard(0)
