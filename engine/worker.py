"""A worker: the device side of one rank. It loads the weights, and owns the KV pools, the kernel set, the
device tables, one ModelRunner per model (with its decode graphs), the draft-logits buffer and the result
buffers on their way back to the host. It runs each step's sub-batches as the core planned them and knows
nothing of requests; the core (engine/core.py) reaches it only through the executor (engine/executor.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rstitch_engine.config import ModelConfig
from rstitch_engine.engine_config import EngineConfig
from rstitch_engine.loader import load_weights
from rstitch_engine.protocol import SLM
from rstitch_engine.random_models import random_weights

from .kv_pool import KVPool
from .model_runner import DeviceTables, ModelRunner
from .ops import Ops
from .plan import HostPlan, PlanLayout
from .readback import StepResults
from .sequence import SequenceForward


class Worker:
    """Built in two stages, as vLLM's workers are: the weights first, then (`init_cache`) the KV pools and
    everything sized by them, once the core has measured the memory the weights left.

    Tensor parallelism (engine/mp_executor.py): worker `rank` of `EngineConfig.tensor_parallel_size` holds its
    shard of each model the config shards (ModelConfig.shard, load_weights' `shard`) and the whole of the
    others, and `all_reduce` (a torch.distributed collective) joins the shards' partial outputs."""

    def __init__(self, config: EngineConfig, models: dict[int, ModelConfig], paths: dict[int, Path | None],
                 *, vocab_limit: int, rank: int = 0, all_reduce=None):
        self.vocab_limit, self.device, dtype = vocab_limit, config.torch_device, config.torch_dtype
        self.config, self.rank, self.all_reduce = config, rank, all_reduce
        sizes = {m: config.tp_size(m) for m in models}
        self.models = {m: models[m].shard(sizes[m]) for m in models}
        self.weights = {}
        for m, p in paths.items():
            if p is not None:
                self.weights[m] = load_weights(p, models[m], dtype, self.device,
                                               shard=(rank, sizes[m]) if sizes[m] > 1 else (0, 1))
            else:  # random weights of a named shape (benchmarks), seeded per model; never split (mp_executor)
                self.weights[m] = random_weights(models[m], dtype, self.device, seed=config.seed + m)
        self.runners: dict[int, ModelRunner] = {}
        self.draft_logits: torch.Tensor | None = None

    def init_cache(self, layout: PlanLayout, *, num_blocks: int, max_model_len: int) -> None:
        """KV pools of `num_blocks` blocks per model, the kernel set, the device tables, the runners (and
        their graphs: captured here) and the result buffers."""
        config, models, device = self.config, self.models, self.device
        self.layout = layout
        self.kv_pools = {m: KVPool(models[m], num_blocks, config.block_size, config.torch_dtype, device)
                         for m in models}
        self.ops = Ops(triton=config.use_triton)
        self.tables = DeviceTables(config.max_num_seqs, layout.max_blocks_per_seq, max_model_len, device)
        self.runners = {m: ModelRunner(m, models[m], self.weights[m], self.kv_pools[m], self.ops, self.tables,
                                       layout, self.vocab_limit, max_model_len, device,
                                       all_reduce=self.all_reduce if config.tp_size(m) > 1 else None)
                        for m in models}
        mode = config.graph_mode
        if mode is not None:
            from .cuda_graphs import StepGraphs

            pool = torch.cuda.graph_pool_handle() if mode == "capture" else None
            for runner in self.runners.values():
                runner.graphs = StepGraphs(runner, pool, emulate=mode == "emulate")
        capacity = next(iter(self.runners.values())).logits_capacity
        # two sets: a step's results are read back while the next step, planned into the other set, runs
        self.results = [{m: StepResults(capacity, device) for m in self.runners} for _ in range(2)]

    # ---- steps ---------------------------------------------------------------------------------------------
    def execute(self, parity: int, plans: dict[int, HostPlan], table_updates: torch.Tensor) -> list[int]:
        """Launches each model's planned sub-batch of one step (result set `parity`) and queues the copy of
        its results to the host; returns the models that ran."""
        self.tables.apply_updates(table_updates, self.layout.table_update_capacity)
        ran = []
        for m, runner in self.runners.items():
            if plans[m].count("num_rows") == 0:
                continue
            res = self.results[parity][m]
            key = runner.prepare(plans[m], self.draft_logits)
            res.begin()
            res.fetch(runner.results, *runner.run(plans[m], key, self.draft_logits))
            ran.append(m)
        return ran

    def step_results(self, parity: int, model: int) -> tuple[tuple[np.ndarray, ...], float]:
        """(tokens, entropies, flags) of `model`'s part of the step launched into set `parity`, on the host,
        and its device time (s); waits for them."""
        res = self.results[parity][model]
        seconds = res.wait()
        return res.numpy, seconds

    # ---- state every rank must agree on (the executor broadcasts these) -------------------------------------
    def install_router(self, router, temperature: float) -> None:
        """Puts an R-Stitch+ router (router/model.py Router) on the SLM's runner, deciding at `temperature`."""
        self.runners[SLM].set_router(router.to(self.device).on_device(temperature))

    def grow_draft_logits(self, k: int, dtype: torch.dtype) -> None:
        """Sampled speculative decoding keeps each draft's SLM logits until its verification: room for k
        drafts per sequence slot. Between steps only (the core checks)."""
        if self.draft_logits is None or self.draft_logits.shape[1] < k:
            slots = self.tables.tokens.shape[0]
            self.draft_logits = torch.zeros(slots, k, self.vocab_limit, dtype=dtype, device=self.device)
            for runner in self.runners.values():  # graphs that use the draft logits hold the old buffer
                if runner.graphs is not None:
                    runner.graphs.forget(lambda flags: flags.uses_draft_logits)

    # ---- single-sequence forwards outside the step loop (warm-start labels) --------------------------------
    @torch.inference_mode()
    def teacher_forced_logits(self, model: int, ids: list[int], positions: list[int]) -> torch.Tensor:
        """[len(positions), vocab_limit] float32 on the worker's device: `model`'s next-token logits after each
        prefix ids[:p + 1], p in `positions`, from one forward over `ids` with a private KV pool (the same
        weights and ops as the steps)."""
        runner = self.runners[model]
        sequence = SequenceForward(runner.cfg, runner.weights, runner.ops, len(ids),
                                   block_size=runner.pool.block_size, all_reduce=runner.all_reduce)
        logits = sequence.logits(torch.tensor(ids, device=self.device),
                                 rows=torch.tensor(positions, dtype=torch.int32, device=self.device))
        return logits[:, :self.vocab_limit].float()
