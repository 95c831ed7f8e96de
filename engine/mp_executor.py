"""Tensor parallelism over processes (docs/design.md, 'Tensor parallelism'): an executor with the Executor's
interface whose rank 0 worker runs in the engine's process and ranks 1..N-1 each in a spawned process (never
forked: CUDA and threads do not survive a fork), joined by a torch.distributed process group (NCCL on CUDA,
gloo on the CPU) in which each tensor-parallel model all-reduces twice per layer.

Rank 0 hosts the scheduler. Every step it sends the step's plan buffers and block-table updates to the other
ranks over a pipe (numpy copies: nothing shares memory with the pinned buffers the next step rewrites), then
runs its own part; every rank computes the whole step (the LM head is whole on each rank, so every rank's
stitch step writes the same tokens into its own device token table), and only rank 0's results are read.
`collective_rpc` runs a Worker method on every rank and returns their answers.

Failure: every collective has a timeout (COLLECTIVE_TIMEOUT_S), so a rank that dies makes rank 0's step fail
instead of hang; the executor then names the rank (the Engine fails the requests in flight with that error).
`close()` stops the ranks; they are daemons (they end with the engine's process) and end by themselves when
the engine's process is gone (their pipe closes).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from .plan import HostPlan
from .worker import Worker

COLLECTIVE_TIMEOUT_S = 30  # a peer that stopped answering fails the step after this long
START_TIMEOUT_S = 300      # a rank loads its shard of the weights within this long


RANDOM_WEIGHTS_UNSPLIT = ("tensor parallelism loads each rank's shard from a checkpoint; random weights "
                          "(random:<shape>) run with tensor_parallel_size 1")


class RankError(RuntimeError):
    """A tensor-parallel rank died or failed; the message names it."""


def free_port() -> int:
    """A TCP port free on the loopback now (rendezvous, test servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _all_reduce(rank: int, size: int, port: int, cuda: bool):
    """The ranks' sum-in-place collective. On the CPU a gloo group of its own (rank 0 serves the rendezvous
    store), so that several engines, and the caller's own torch.distributed, coexist in one process; on CUDA
    NCCL as the process's default group (one tensor-parallel CUDA engine per process)."""
    timeout = timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    if cuda:
        if dist.is_initialized():
            raise RuntimeError("a CUDA tensor-parallel engine needs this process's default torch.distributed "
                               "group, which is already initialized (another such engine still open?)")
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                                timeout=timeout)
        return dist.all_reduce
    store = dist.TCPStore("127.0.0.1", port, size, rank == 0, timeout=timedelta(seconds=START_TIMEOUT_S))
    group = dist.ProcessGroupGloo(store, rank, size, timeout)
    return lambda tensor: group.allreduce([tensor]).wait()


def _rank_main(rank: int, size: int, port: int, conn, config, models, paths, vocab_limit: int,
               threads: int) -> None:
    """A rank's process: its worker, then the engine's steps and calls until told to stop."""
    torch.set_num_threads(threads)
    cuda = config.torch_device.type == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
        config = config.replace(device=f"cuda:{rank}")
    try:
        worker = Worker(config, models, paths, vocab_limit=vocab_limit, rank=rank,
                        all_reduce=_all_reduce(rank, size, port, cuda))
        conn.send(("ok", None))
        host: dict = {}
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the engine's process is gone
                return
            kind = message[0]
            if kind == "stop":
                return
            if kind == "execute":
                _, parity, plans, updates = message
                for m, (i32, f32) in plans.items():  # this rank's copy of the plan buffers
                    plan = host.setdefault((parity, m), HostPlan(worker.layout, pin=False))
                    plan.i32_np[:] = i32
                    plan.f32_np[:] = f32
                worker.execute(parity, {m: host[(parity, m)] for m in plans}, torch.from_numpy(updates))
            else:
                _, method, args, kwargs = message
                conn.send(("ok", getattr(worker, method)(*args, **kwargs)))
    except BaseException as e:  # noqa: BLE001 - reported to the engine, which names this rank
        try:
            conn.send(("error", f"{type(e).__name__}: {e}"))
        except (OSError, ValueError):
            pass
        if not isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class MultiprocExecutor:
    def __init__(self, config, models, paths, *, vocab_limit: int):
        size = config.tensor_parallel_size
        cuda = config.torch_device.type == "cuda"
        if cuda and torch.cuda.device_count() < size:
            raise ValueError(f"tensor_parallel_size {size} needs {size} GPUs; this machine has "
                             f"{torch.cuda.device_count()}")
        for m, cfg in models.items():  # what cannot be split fails here, before any process starts
            cfg.shard(config.tp_size(m))
            if paths[m] is None and config.tp_size(m) > 1:
                raise ValueError(RANDOM_WEIGHTS_UNSPLIT)
        port = free_port()
        ctx = mp.get_context("spawn")
        self.cuda = cuda
        threads = max(1, torch.get_num_threads() // size)
        self.ranks, self.conns = [], []
        for rank in range(1, size):
            ours, theirs = ctx.Pipe()
            p = ctx.Process(target=_rank_main, name=f"rstitch-tp-rank{rank}", daemon=True,
                            args=(rank, size, port, theirs, config, models, paths, vocab_limit, threads))
            p.start()
            theirs.close()
            self.ranks.append(p)
            self.conns.append(ours)
        try:
            torch.set_num_threads(threads)
            self.worker = Worker(config, models, paths, vocab_limit=vocab_limit, rank=0,
                                 all_reduce=_all_reduce(0, size, port, cuda))
            self._answers(START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    # ---- the Executor's interface -------------------------------------------------------------------------
    def execute(self, parity: int, plans: dict[int, HostPlan], table_updates: torch.Tensor) -> list[int]:
        message = ("execute", parity, {m: (p.i32_np.copy(), p.f32_np.copy()) for m, p in plans.items()},
                   table_updates.numpy().copy())
        self._send(message)
        try:
            return self.worker.execute(parity, plans, table_updates)
        except Exception as e:
            raise self._rank_failure() or e

    def step_results(self, parity: int, model: int):
        return self.worker.step_results(parity, model)

    def collective_rpc(self, method: str, *args, **kwargs) -> list:
        self._send(("rpc", method, args, kwargs))
        try:
            mine = getattr(self.worker, method)(*args, **kwargs)
        except Exception as e:
            raise self._rank_failure() or e
        return [mine, *self._answers(COLLECTIVE_TIMEOUT_S + 30)]

    def close(self) -> None:
        """Stops the other ranks (killed if they do not stop within seconds) and leaves the process group."""
        for conn in self.conns:
            try:
                conn.send(("stop",))
            except (OSError, ValueError):
                pass
        for p in self.ranks:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        for conn in self.conns:
            conn.close()
        self.ranks, self.conns = [], []
        if self.cuda and dist.is_initialized():
            dist.destroy_process_group()

    # ---- helpers -----------------------------------------------------------------------------------------
    def _send(self, message) -> None:
        for rank, conn in enumerate(self.conns, start=1):
            try:
                conn.send(message)
            except (OSError, ValueError):
                raise self._rank_failure() or RankError(f"tensor-parallel rank {rank} is gone") from None

    def _answers(self, timeout: float) -> list:
        answers = []
        for rank, (p, conn) in enumerate(zip(self.ranks, self.conns), start=1):
            if not conn.poll(timeout):
                raise self._rank_failure() or RankError(f"tensor-parallel rank {rank} did not answer within "
                                                        f"{timeout:.0f} s")
            try:
                status, value = conn.recv()
            except (EOFError, OSError):
                raise self._rank_failure() or RankError(f"tensor-parallel rank {rank} is gone") from None
            if status == "error":
                raise RankError(f"tensor-parallel rank {rank} failed: {value}")
            answers.append(value)
        return answers

    def _rank_failure(self) -> RankError | None:
        """Why a step or call failed if a rank died or reported an error (it is then named), else None."""
        for rank, (p, conn) in enumerate(zip(self.ranks, self.conns), start=1):
            if p.exitcode is not None:
                return RankError(f"tensor-parallel rank {rank} died (exit code {p.exitcode})")
            try:
                if conn.poll(0):
                    status, value = conn.recv()
                    if status == "error":
                        return RankError(f"tensor-parallel rank {rank} failed: {value}")
            except (EOFError, OSError):
                return RankError(f"tensor-parallel rank {rank} is gone")
        return None
