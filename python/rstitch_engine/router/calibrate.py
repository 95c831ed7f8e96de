"""`rstitch calibrate`: profiles forwards on the current device through the engine's own step path, then fits
the latency model (router/latency.py).

How the wanted forwards are produced: a real `Engine` runs synthetic requests whose plans contain exactly those
forwards, and the engine's own step timings (`Engine.step_timings`: each model's part of each step, plan upload,
forward, LM head and stitch step, replayed from a CUDA graph where the engine would use one) are kept. SLMOnly
requests profile the SLM, LLMOnly ones the LLM.
  * extend (N_inf new tokens over N_kv cached): a one-token request whose prompt has N_kv + N_inf tokens, on an
    engine whose step budget (`max_num_batched_tokens`) is the `chunk`: the scheduler prefills the first N_kv
    tokens in chunks without logits, then runs the last N_inf with their logits row over the N_kv cached ones,
    which is the catch-up extend R-Stitch runs after a switch. So N_kv is a multiple of the chunk and
    N_inf <= chunk; only forwards that decide a token are kept (prefill chunks skip the LM head).
  * decode (one token over N_kv, B rows): B requests with prompts of N_kv tokens generate tokens until every
    one of them has decoded `warmup + repeats` steps together; those steps are kept, N_kv is their mean
    context over the rows.
Timing: wall time on the CPU; on CUDA, events around the model's part of the step as the engine runs it
(engine/readback.py: overlapped with the next step's planning, so no idle gap before a forward is counted;
latency files calibrated before 2026-12-07 synchronized around each forward instead). Every grid point: the
median over `repeats` after `warmup` discarded runs.

NOTE: the CPU's reference attention gathers every row's context up to max_model_len, so there a forward's time
also grows with the engine's max_model_len: profile with the max_model_len the timed runs will use.
"""
from __future__ import annotations

import random
import statistics
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..policies import LLM, SLM, LLMOnly, SLMOnly
from ..sampling_params import SamplingParams
from .latency import LatencyModel, Timing

POLICIES = {SLM: SLMOnly(), LLM: LLMOnly()}


@dataclass(frozen=True)
class Grid:
    """What to profile. Extends: every N_inf in `new_tokens` over N_kv = k * chunk for k in `kv_chunks` (the
    chunk is the engine's max_num_batched_tokens). Decodes: every N_kv in `decode_kv` at every batch size."""
    new_tokens: tuple[int, ...] = (2, 16, 64, 128)
    kv_chunks: tuple[int, ...] = (0, 1, 2)
    decode_kv: tuple[int, ...] = (32, 128, 256)
    batch_sizes: tuple[int, ...] = (1, 4)
    warmup: int = 1
    repeats: int = 3

    def check(self, chunk: int) -> None:
        if not self.new_tokens or any(n < 2 or n > chunk for n in self.new_tokens):
            raise ValueError(f"extend sizes must be in [2, chunk={chunk}] (1 is a decode), got {self.new_tokens}")
        if not self.kv_chunks or any(k < 0 for k in self.kv_chunks):
            raise ValueError(f"kv_chunks must be integers >= 0, got {self.kv_chunks}")
        if not self.decode_kv or any(d < 1 for d in self.decode_kv):
            raise ValueError(f"decode contexts must be >= 1, got {self.decode_kv}")
        if not self.batch_sizes or 1 not in self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be >= 1 and include 1 (the estimator's), got {self.batch_sizes}")
        if self.warmup < 0 or self.repeats < 1:
            raise ValueError(f"need warmup >= 0 and repeats >= 1, got {self.warmup}, {self.repeats}")

    def max_context(self, chunk: int) -> int:
        extend = max(self.kv_chunks) * chunk + max(self.new_tokens)
        decode = max(self.decode_kv) + _decode_tokens(self, max(self.decode_kv), max(self.batch_sizes), chunk)
        return max(extend, decode) + 1


CPU_GRID = Grid()
CUDA_GRID = Grid(new_tokens=(2, 8, 32, 128, 512), kv_chunks=(0, 1, 2, 4, 8),
                 decode_kv=(64, 512, 1024, 2048, 4096, 8192), batch_sizes=(1, 8, 32), warmup=2, repeats=5)
CPU_CHUNK, CUDA_CHUNK = 128, 512


def default_grid(device: torch.device | str) -> tuple[Grid, int]:
    """(grid, chunk) for a device: small on the CPU, where a 1.5B forward of 100 tokens takes seconds."""
    return (CUDA_GRID, CUDA_CHUNK) if torch.device(device).type == "cuda" else (CPU_GRID, CPU_CHUNK)


def _decode_tokens(grid: Grid, n_kv: int, batch: int, chunk: int) -> int:
    """Tokens per request so that all `batch` requests decode together for warmup + repeats steps: the
    scheduler prefills them one after the other, so the first may decode while the others still prefill."""
    stagger = -(-n_kv // max(chunk - batch, 1)) + 1
    return (batch - 1) * stagger + grid.warmup + grid.repeats + 1


def _median_ms(values: list[float], grid: Grid, what: str) -> float:
    kept = values[grid.warmup:]
    if len(kept) < 1:
        raise RuntimeError(f"calibrate: no timed {what} after the warm-up; the plans did not contain it")
    return statistics.median(kept)


def _extend_timing(engine, model: int, n: int, n_kv: int, grid: Grid, prompt) -> Timing:
    """One request per repeat whose prompt ends in the wanted extend (chunked prefill before it)."""
    ms = []
    for _ in range(grid.warmup + grid.repeats):
        with engine.step_timings() as steps:
            engine.generate([prompt(n_kv + n)], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
                            POLICIES[model], use_tqdm=False)
        ms += [t.seconds * 1e3 for t in steps if t.model == model and t.logits == 1 and t.tokens == n]
    return Timing(model, n, n_kv, _median_ms(ms, grid, f"extend ({n}, {n_kv})"))


def _decode_timing(engine, model: int, n_kv: int, batch: int, grid: Grid, prompt) -> Timing:
    """`batch` requests decoding together; the steps where all of them decode one token are timed."""
    chunk = engine.core.scheduler_config.max_step_tokens
    params = SamplingParams(max_tokens=_decode_tokens(grid, n_kv, batch, chunk), temperature=0.0, ignore_eos=True)
    with engine.step_timings() as steps:
        engine.generate([prompt(n_kv) for _ in range(batch)], params, POLICIES[model], use_tqdm=False)
    steps = [t for t in steps if t.model == model and t.rows == t.tokens == t.logits == batch]
    steps = steps[:grid.warmup + grid.repeats]
    ms = _median_ms([t.seconds * 1e3 for t in steps], grid, f"decode step over {n_kv} at batch {batch}")
    n_kv = statistics.median((t.context - t.tokens) / t.rows for t in steps[grid.warmup:])  # mean cached per row
    return Timing(model, 1, n_kv, ms, batch)


def profile(engine, grid: Grid | None = None, *, seed: int = 0, progress: bool = True) -> list[Timing]:
    """Timings of every grid point for every model the engine loaded (see the module docstring)."""
    chunk = engine.core.scheduler_config.max_step_tokens
    grid = grid or default_grid(engine.device)[0]
    grid.check(chunk)
    if max(grid.batch_sizes) > engine.core.scheduler_config.max_num_seqs:
        raise ValueError(f"batch size {max(grid.batch_sizes)} exceeds the engine's max_num_seqs "
                         f"{engine.core.scheduler_config.max_num_seqs}")
    if grid.max_context(chunk) > engine.max_model_len:
        raise ValueError(f"the grid needs {grid.max_context(chunk)} positions; the engine holds "
                         f"{engine.max_model_len}")
    rng = random.Random(seed)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(engine.vocab_limit) for _ in range(n)]

    points = [(k * chunk, n, None) for k in grid.kv_chunks for n in grid.new_tokens] + \
             [(n_kv, 1, b) for b in grid.batch_sizes for n_kv in grid.decode_kv]
    timings = []
    with tqdm(total=len(engine.paths) * len(points), desc="calibrate", unit="point", disable=not progress) as bar:
        for model in sorted(engine.paths):
            for n_kv, n, batch in points:
                timings.append(_extend_timing(engine, model, n, n_kv, grid, prompt) if batch is None else
                               _decode_timing(engine, model, n_kv, batch, grid, prompt))
                bar.update(1)
    return timings


def environment(device: torch.device) -> dict:
    """Device name and versions the timings belong to."""
    from ..evaluation.report import collect_meta

    meta = collect_meta()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else meta["device"]
    return {"device": name, "torch": torch.__version__, "triton": triton_version, "date": meta["date"],
            "command": meta["command"]}


def calibrate(engine, grid: Grid | None = None, *, holdout: float = 0.2, seed: int = 0, progress: bool = True,
              meta: dict | None = None) -> LatencyModel:
    """Profiles `engine` on its device and fits the latency model; the grid, the raw timings, the device and
    versions are kept in its metadata. Save it with `.save(path)`."""
    grid = grid or default_grid(engine.device)[0]
    timings = profile(engine, grid, seed=seed, progress=progress)
    info = {**environment(engine.device), "models": {name: str(engine.paths[m]) for m, name in
                                                     ((SLM, "slm"), (LLM, "llm")) if m in engine.paths},
            "dtype": str(engine.dtype).removeprefix("torch."), "chunk": engine.core.scheduler_config.max_step_tokens,
            "grid": asdict(grid), "timings": [asdict(t) for t in timings], **(meta or {})}
    return LatencyModel.fit(timings, holdout=holdout, seed=seed, meta=info)
