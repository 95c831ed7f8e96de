"""The device side of an Engine, built from a resolved `EngineConfig`: the C++ scheduler, one KV pool per
model, the kernel set, the device tables, one ModelRunner per model (with its decode graphs), and the
step loop. The Engine (python/rstitch_engine/api.py) only turns requests into scheduler specs and outputs.
"""
from __future__ import annotations

import logging

import torch

from rstitch_engine import _C
from rstitch_engine.config import ModelConfig
from rstitch_engine.engine_config import EngineConfig
from rstitch_engine.models.decoder import ModelWeights

from .kv_pool import KVPool, num_blocks_for_budget
from .model_runner import DeviceTables, ModelRunner
from .ops import Ops
from .step_loop import StepLoop

log = logging.getLogger("rstitch_engine")


class Runtime:
    def __init__(self, config: EngineConfig, models: dict[int, ModelConfig], weights: dict[int, ModelWeights],
                 *, vocab_limit: int, max_model_len: int):
        device, dtype = config.torch_device, config.torch_dtype
        num_blocks, self.max_model_len = _pool_size(config, list(models.values()), dtype, max_model_len)
        self.scheduler_config = config.scheduler_config(
            _C, num_blocks=num_blocks, max_model_len=self.max_model_len, vocab_size=vocab_limit,
            has_model=(0 in models, 1 in models))
        self.sched = _C.Scheduler(self.scheduler_config)
        self.kv_pools = {m: KVPool(models[m], num_blocks, config.block_size, dtype, device) for m in models}
        self.ops = Ops(triton=config.use_triton)
        self.tables = DeviceTables(config.max_num_seqs, self.sched.max_blocks_per_seq, self.max_model_len, device)
        self.runners = {m: ModelRunner(m, models[m], weights[m], self.kv_pools[m], self.ops, self.tables,
                                       self.sched, vocab_limit, self.max_model_len, device) for m in models}
        mode = config.graph_mode
        if mode is not None:
            from .cuda_graphs import StepGraphs

            pool = torch.cuda.graph_pool_handle() if mode == "capture" else None
            for runner in self.runners.values():
                runner.graphs = StepGraphs(runner, self.sched.max_rows, self.scheduler_config.max_step_tokens, pool,
                                           emulate=mode == "emulate")
        self.loop = StepLoop(self.sched, self.runners, self.tables, device, self.scheduler_config.max_inflight)


def _pool_size(config: EngineConfig, models: list[ModelConfig], dtype: torch.dtype,
               max_model_len: int) -> tuple[int, int]:
    """(KV blocks per pool, the context limit those blocks allow). The pool never holds more than
    max_num_seqs full-length requests; a budget too small for one full-length request lowers the limit."""
    budget = config.kv_budget_bytes()
    block = config.block_size
    num_blocks = min(num_blocks_for_budget(budget, block, models, dtype),
                     -(-config.max_num_seqs * max_model_len // block))
    if num_blocks < 1:
        per_token = sum(c.kv_bytes_per_token(dtype) for c in models)
        raise ValueError(f"kv_cache_gb: a KV budget of {budget / 2**30:.3f} GB holds no block of {block} tokens "
                         f"({per_token * block / 2**20:.2f} MB a block for both models); raise kv_cache_gb")
    if num_blocks * block < max_model_len:
        held = num_blocks * block
        # Requested explicitly: a warning; the models' default context lowered: information only.
        level = logging.WARNING if config.max_model_len is not None else logging.INFO
        log.log(level, "max_model_len lowered from %d to %d tokens (prompt + output): that is what a KV cache of "
                "%.2f GiB holds for both models (kv_cache_gb; default 1 GiB on the CPU, the free memory on CUDA). "
                "kv_cache_gb=%.1f holds the full %d; a smaller max_model_len silences this", max_model_len, held,
                budget / 2**30, budget / 2**30 * max_model_len / held, max_model_len)
        max_model_len = held
    return num_blocks, max_model_len
