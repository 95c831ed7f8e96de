"""`EngineConfig`: every option of an `Engine`, its default, its validation, and its resolution against the
device (defaults that depend on CUDA being there) and the models (the context length, the KV pool size).

The engine core (`rstitch_engine.engine.core`) and its workers are built from a resolved config only;
`Engine(**options)` and `Engine(config=EngineConfig(...))` are the same thing.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checks
from .protocol import SLM

# the values of EngineConfig.dtype / --dtype
DTYPE_OPTIONS = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}
KERNELS = ("triton", "torch")
CUDA_RESERVE_BYTES = 2 * 2**30  # left free beside the KV pools on CUDA: activations and graph pools
CPU_KV_BUDGET_BYTES = 2**30  # the KV budget on the CPU when kv_cache_gb is not given


# Parking defaults, chosen with the step simulator on measured costs (docs/benchmarks.md, 'Hybrid decoding
# under load'): the LLM runs once three quarters of the requests that could need it are ready, or one
# waited 4 steps.
LLM_BATCH_SHARE = 0.75
LLM_MAX_WAIT = 4


def _option(default, help: str, cli: bool = True, **spelling):
    """A field with its documentation (`help`, shown by every command's --help) and how the command line
    spells it (`spelling`: `flag` for a --x / --no-x switch, `choices`, `metavar`); `cli=False` keeps it off
    the command line."""
    return field(default=default, metadata={"help": help, "cli": spelling if cli else None})


@dataclass(frozen=True)
class EngineConfig:
    """Every option of an Engine; each field's `help` says what it does and its default (`EngineConfig.help`),
    and the `rstitch` commands offer each as --field-name (cli_args.engine_args)."""
    llm: str | Path | None = _option(None, "large model: a checkpoint directory, a .gguf file, a hub id, "
                                     "demo:llm, or random:<shape>", cli=False)
    slm: str | Path | None = _option(None, "small model: the same kinds of names as llm", cli=False)
    device: str | torch.device | None = _option(None, "cuda or cpu (default: cuda when available)")
    dtype: str | torch.dtype | None = _option(None, "float32, bfloat16 or float16 (default: bfloat16 on CUDA, "
                                              "float32 on the CPU)", choices=tuple(DTYPE_OPTIONS))
    kv_cache_gb: float | None = _option(None, "KV-cache memory for both models' pools together, in GiB (default: "
                                        "gpu_memory_utilization of the free GPU memory less 2 GiB on CUDA, 1 GiB "
                                        "on the CPU); it bounds the longest sequence: max_model_len is lowered to "
                                        "the tokens it holds", metavar="GB")
    gpu_memory_utilization: float = _option(0.85, "on CUDA without kv_cache_gb: the share of the free GPU memory "
                                            "(after the weights) the KV pools may take", metavar="SHARE")
    max_model_len: int | None = _option(None, "longest sequence, prompt plus output, in tokens (default: the "
                                        "models' context length, lowered to what kv_cache_gb holds)", metavar="TOKENS")
    max_num_seqs: int = _option(64, "requests in the running batch at once", metavar="N")
    max_num_batched_tokens: int = _option(2048, "new tokens per model per step; longer prompts are prefilled in "
                                          "chunks", metavar="TOKENS")
    max_logits_rows: int | None = _option(None, "logits rows per model per step (default: the smaller of "
                                          "max_num_batched_tokens and 4 x max_num_seqs)", metavar="ROWS")
    block_size: int = _option(16, "tokens per KV block", metavar="TOKENS")
    prefix_caching: bool = _option(True, "share the KV of full blocks of equal prompt prefixes between requests, "
                                   "per model, cached until their blocks are needed (docs/design.md, 'Prefix "
                                   "caching'); outputs are the same either way", flag=True)
    overlap: bool | None = _option(None, "plan step t+1 before step t's results are read (default: on CUDA)",
                                   flag=True)
    optimistic_llm: bool = _option(True, "with overlap, dispatch rows as if the pending decisions kept their "
                                   "model, fixing up those that flipped", flag=True)
    llm_batch_share: float = _option(LLM_BATCH_SHARE, "park rows that need the LLM until this share of the "
                                     "requests that could need it are ready (0: never park; docs/method.md, "
                                     "'Scheduling the LLM under load'; the same rules decide every token)",
                                     metavar="SHARE")
    llm_min_batch: int = _option(1, "park rows that need the LLM until at least this many are ready", metavar="ROWS")
    llm_max_wait: int = _option(LLM_MAX_WAIT, "the most steps a parked row waits for the LLM", metavar="STEPS")
    tensor_parallel_size: int = _option(1, "processes (CUDA: GPUs) the LLM is split over, tensor-parallel "
                                        "(engine/mp_executor.py; docs/design.md, 'Tensor parallelism')",
                                        metavar="RANKS")
    slm_tensor_parallel_size: int = _option(1, "1: the SLM whole on every rank; or tensor_parallel_size: split "
                                            "like the LLM", metavar="RANKS")
    kernels: str | None = _option(None, "triton or torch (default: Triton on CUDA, the torch references on the "
                                  "CPU)", choices=KERNELS)
    cuda_graphs: bool | str | None = _option(None, "capture decode steps as CUDA graphs (default: on CUDA; "
                                             "'emulate' runs the same padded static-shape steps without capturing, "
                                             "for tests on the CPU)", cli=False)
    seed: int = _option(0, "seed of the engine's random state (requests without a seed, random weights)", cli=False)
    progress: bool = _option(False, "show download and import progress", cli=False)
    warm_up: bool | None = _option(None, "run the extend, decode and large-batch paths of each model once at "
                                   "construction, so that Triton compiles them there and not inside a timed "
                                   "request (default: on CUDA)", flag=True)

    @staticmethod
    def help(name: str) -> str:
        """The documentation of field `name`."""
        return next(f.metadata["help"] for f in dataclasses.fields(EngineConfig) if f.name == name)

    def __post_init__(self):
        if self.llm is None and self.slm is None:
            raise ValueError("Engine needs llm=..., slm=..., or both")
        for name in ("llm", "slm"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, Path)):
                raise TypeError(f"{name} must be a path or a model name, got {type(value).__name__}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "llm_min_batch"):
            checks.integer(name, getattr(self, name), 1)
        checks.integer("llm_max_wait", self.llm_max_wait, 0)
        checks.integer("tensor_parallel_size", self.tensor_parallel_size, 1, 1024)
        if self.slm_tensor_parallel_size not in (1, self.tensor_parallel_size):
            raise checks.InvalidValue("slm_tensor_parallel_size", f"1 or tensor_parallel_size "
                                      f"({self.tensor_parallel_size})", self.slm_tensor_parallel_size)
        checks.number("llm_batch_share", self.llm_batch_share, 0, 1)
        checks.integer("seed", self.seed, 0, 2**64 - 1)
        for name in ("max_model_len", "max_logits_rows"):
            if getattr(self, name) is not None:
                checks.integer(name, getattr(self, name), 1)
        if self.kv_cache_gb is not None:
            checks.number("kv_cache_gb", self.kv_cache_gb, 0, low_open=True, high_open=True)
        checks.number("gpu_memory_utilization", self.gpu_memory_utilization, 0, 1, low_open=True)
        if self.kernels not in (None, *KERNELS):
            raise ValueError(f"kernels must be one of {KERNELS}, got {self.kernels!r}")
        if self.warm_up not in (None, True, False):
            raise ValueError(f"warm_up must be True, False or None (on CUDA), got {self.warm_up!r}")
        if self.cuda_graphs not in (None, True, False, "emulate"):
            raise ValueError(f"cuda_graphs must be True, False or 'emulate', got {self.cuda_graphs!r}")
        for name in ("overlap", "optimistic_llm", "progress", "prefix_caching"):
            if getattr(self, name) is not None:
                checks.flag(name, getattr(self, name))
        if self.dtype is not None and not isinstance(self.dtype, torch.dtype) and self.dtype not in DTYPE_OPTIONS:
            raise ValueError(f"unknown dtype {self.dtype!r}; use one of {sorted(DTYPE_OPTIONS)}")
        if self.dtype is not None and isinstance(self.dtype, torch.dtype) and self.dtype not in DTYPE_OPTIONS.values():
            raise ValueError(f"dtype {self.dtype} is not supported; use one of {sorted(DTYPE_OPTIONS)}")

    def tp_size(self, model: int) -> int:
        """The tensor-parallel size of `model` (protocol.SLM or LLM)."""
        return self.slm_tensor_parallel_size if model == SLM else self.tensor_parallel_size

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)

    # ---- resolution against the machine --------------------------------------------------------------
    @property
    def torch_device(self) -> torch.device:
        try:
            device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError as e:
            raise ValueError(f"device {self.device!r}: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: this torch build has no CUDA device "
                             f"(torch {torch.__version__}); use device='cpu'")
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"device {self.device!r}: only 'cuda' and 'cpu' are supported")
        return device

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype is None:
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return self.dtype if isinstance(self.dtype, torch.dtype) else DTYPE_OPTIONS[self.dtype]

    @property
    def on_cuda(self) -> bool:
        return self.torch_device.type == "cuda"

    @property
    def use_overlap(self) -> bool:
        return self.on_cuda if self.overlap is None else self.overlap

    @property
    def use_warm_up(self) -> bool:
        return self.on_cuda if self.warm_up is None else self.warm_up

    @property
    def use_triton(self) -> bool:
        return self.kernels == "triton" or (self.kernels is None and self.on_cuda)

    @property
    def graph_mode(self) -> str | None:
        """None (eager), "capture" or "emulate"."""
        graphs = self.on_cuda if self.cuda_graphs is None else self.cuda_graphs
        if not graphs:
            return None
        return "emulate" if graphs == "emulate" or not self.on_cuda else "capture"

    def kv_budget_bytes(self) -> int:
        if self.kv_cache_gb is not None:
            return int(self.kv_cache_gb * 2**30)
        if self.on_cuda:
            free, _ = torch.cuda.mem_get_info(self.torch_device)
            return int(free * self.gpu_memory_utilization) - CUDA_RESERVE_BYTES
        return CPU_KV_BUDGET_BYTES

    def scheduler_config(self, C, *, num_blocks: int, max_model_len: int, vocab_size: int,
                         has_model: tuple[bool, bool]):
        """The C++ scheduler's config (`C` is the `_C` extension module)."""
        sc = C.SchedulerConfig()
        sc.num_blocks, sc.block_size, sc.max_num_seqs = num_blocks, self.block_size, self.max_num_seqs
        sc.max_model_len, sc.max_step_tokens = max_model_len, self.max_num_batched_tokens
        sc.max_logits_rows = self.max_logits_rows or min(self.max_num_batched_tokens, 4 * self.max_num_seqs)
        sc.has_model = has_model
        sc.vocab_size = vocab_size
        sc.max_inflight = 2 if self.use_overlap else 1
        sc.optimistic_llm = self.optimistic_llm
        sc.watermark_blocks = max(1, num_blocks // 100)
        sc.llm_min_batch, sc.llm_max_wait = self.llm_min_batch, self.llm_max_wait
        sc.llm_batch_share = self.llm_batch_share
        sc.prefix_caching = self.prefix_caching
        return sc

