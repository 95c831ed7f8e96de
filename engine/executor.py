"""The executor: the engine core's one door to its workers (vLLM v1's layering). The core plans a step, hands
the plans to `execute` and later collects each model's results; everything else a worker must do on every
rank alike (build the KV cache, install a router, size the draft buffers, a forward outside the step loop)
goes through
`collective_rpc`, which calls a Worker method by name and returns each rank's answer. This executor runs one
worker in the engine's own process; with tensor parallelism the core uses engine/mp_executor.py instead.
"""
from __future__ import annotations

import numpy as np
import torch

from .plan import HostPlan
from .worker import Worker


class Executor:
    def __init__(self, *args, **kwargs):
        """Builds the worker (Worker's arguments: config, models, paths, vocab_limit): it loads the weights;
        `collective_rpc("init_cache", ...)` builds the rest."""
        self.worker = Worker(*args, **kwargs)

    def execute(self, parity: int, plans: dict[int, HostPlan], table_updates: torch.Tensor) -> list[int]:
        """Launches one step (Worker.execute); returns the models that ran."""
        return self.worker.execute(parity, plans, table_updates)

    def step_results(self, parity: int, model: int) -> tuple[tuple[np.ndarray, ...], float]:
        """One model's results of a launched step and its device time (Worker.step_results)."""
        return self.worker.step_results(parity, model)

    def collective_rpc(self, method: str, *args, **kwargs) -> list:
        """Calls Worker.`method` on every worker; their answers, rank 0 first."""
        return [getattr(self.worker, method)(*args, **kwargs)]

    def close(self) -> None:
        """Nothing to stop: the worker lives in this process (MultiprocExecutor stops its ranks here)."""
