"""Skinny GEMMs for decode (M <= 16 rows) with the op before and after them fused in:

    norm_linear      r = h + residual (h alone without one); y = (rmsnorm(r) * norm_weight) @ W^T + bias
    linear           y = x @ W^T
    silu_mul_linear  y = (silu(g) * u) @ W^T, gate_up = [g | u]

W [N, K] row-major (as nn.Linear stores it), bf16 / fp16 / fp32, float32 accumulation. Rounding points
follow the references (rms_norm_ref / silu_and_mul_ref then F.linear): r and the left operand are
rounded to the weight dtype before the product, the output once at the end. In float32 the fused
kernels differ from the references by summation order only.

NOTE: layout. A program owns BLOCK_N rows of W (= output columns) and streams them over K in
[BLOCK_N, BLOCK_K] tiles: K contiguous, so 16-byte cp.async loads into shared memory, NUM_STAGES - 1
tiles in flight (24 KB per program at the defaults). The M activation rows are padded to a power of
two (at least MIN_ROWS) and multiplied with tl.dot, which pads them further to the 16-row MMA on
tensor cores: idle tensor-core cycles are free in this memory-bound kernel, and the prologue only
works on the real rows. x tiles are small L2-resident reloads (each program reads M x K of them).
NOTE: norm. rsqrt(mean(r^2)) is one scalar per row, so it factors out of the dot: every program
accumulates (r * norm_weight) @ W^T and sum(r^2) over its K range in the same pass and scales in the
epilogue. No separate norm kernel and no pre-pass over x before the first weight load. (For fp16 this
needs |r * norm_weight| < 65504, as r itself is already an fp16 residual stream.) The N-tile-0
programs write r when a residual is added.
NOTE: split-K. With fewer than MIN_TILES_PER_SM N tiles per SM, K is cut into splits (about
SPLIT_PROGRAMS_PER_SM programs per SM); each writes float32 partial sums (and partial sum(r^2)) to
scratch, and the last split of an N tile to arrive (common.last_arrival) adds them in split order
(deterministic) and runs the same epilogue: one launch either way. The real shapes (N >= 1536: 96+
tiles of 16 on 132 SMs) do not split by default.
NOTE: residual adds. The decoder adds the o_proj and down outputs in the next norm_linear's prologue,
which keeps the unfused path (F.linear + rms_norm with residual) at its kernel count and both paths
rounding the residual stream at the same points; so no GEMV has a residual epilogue.
Launch grids depend on shapes only (no host sync): CUDA-graph capturable.

Tuning constants (module level, read at launch; bench/kernel_micro.py --sweep times alternatives), overridden
per shape by GEMV_CONFIGS: (rows padded to a power of two, N, K, weight dtype) -> the constants measured
best there, which `bench/kernel_micro.py --sweep` writes as JSON and `load_gemv_configs` installs, or
RSTITCH_GEMV_CONFIGS=<file> at the first launch (entries installed explicitly win). Expected
H100 choice, to be confirmed by the sweep: BLOCK_N 16 (32 at M = 16 if x reloads show), BLOCK_K 256,
4 warps, 4 stages, MIN_ROWS 1 (sm_90a: 26-29 KB shared memory and 40-96 registers at M = 1, 49-75 KB
and up to 133 registers at M = 16, no spills), no split-K at the real shapes.
"""
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .activation import silu_and_mul_ref
from .common import arrival_counters, dot, last_arrival, num_sms
from .norm import rms_norm_ref

BLOCK_N = 16
BLOCK_K = 256
NUM_WARPS = 4
NUM_STAGES = 4
MIN_TILES_PER_SM = 0.5
SPLIT_PROGRAMS_PER_SM = 2
MIN_ROWS = 1
MAX_ROWS = 16

# (rows padded, N, K, weight dtype name) -> {name: value} of TUNABLE, measured on a device (module docstring)
GEMV_CONFIGS: dict[tuple[int, int, int, str], dict[str, int]] = {}
TUNABLE = ("BLOCK_N", "BLOCK_K", "NUM_STAGES", "NUM_WARPS", "SPLITS")
POWERS_OF_TWO = ("BLOCK_N", "BLOCK_K", "NUM_WARPS")
MIN_BLOCK = 16  # BLOCK_N and BLOCK_K: tl.dot's smallest tile on sm_90
_configs_from_env = False

PLAIN = tl.constexpr(0)
NORM = tl.constexpr(1)
SILU_MUL = tl.constexpr(2)


@triton.jit
def _operand(x_ptr, residual_ptr, norm_weight_ptr, residual_out_ptr, rows, cols, n_rows, K,
             x_stride, residual_stride, residual_out_stride, write_residual, sumsq,
             PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """A [ROWS, BLOCK_K] tile of the left operand with the prologue applied (float32), and the running
    per-row sum of r^2 for the norm."""
    mask = (rows < n_rows)[:, None] & (cols < K)[None, :]
    offsets = rows[:, None] * x_stride + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    if PROLOGUE == NORM:
        if HAS_RESIDUAL:
            residual = tl.load(residual_ptr + rows[:, None] * residual_stride + cols[None, :], mask=mask, other=0.0)
            x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)  # rounded as the stream is stored
            # NOTE: a branch on the program-uniform flag, not `mask & write_residual`: triton 3.9's
            # interpreter turns a scalar int1 and'ed with a block mask into int32 and refuses it.
            if write_residual:
                tl.store(residual_out_ptr + rows[:, None] * residual_out_stride + cols[None, :], x, mask=mask)
        x = x.to(tl.float32)
        sumsq += tl.sum(x * x, axis=1)
        x = x * tl.load(norm_weight_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)[None, :]
    elif PROLOGUE == SILU_MUL:
        gate = x.to(tl.float32)
        up = tl.load(x_ptr + offsets + K, mask=mask, other=0.0).to(tl.float32)
        x = gate / (1.0 + tl.exp(-gate)) * up
    return x, sumsq


@triton.jit
def _epilogue(acc, sumsq, rows, cols, n_rows, N, K, eps, bias_ptr, out_ptr, out_stride,
              NORM_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """acc [ROWS, BLOCK] (x @ W^T for output columns `cols`) -> norm scale, + bias, one rounding."""
    mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
    if NORM_SCALE:
        acc = acc * tl.rsqrt(sumsq / K + eps)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * out_stride + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_kernel(x_ptr, residual_ptr, norm_weight_ptr, w_ptr, bias_ptr, out_ptr, residual_out_ptr,
                 part_ptr, part_sumsq_ptr, counter_ptr, n_rows, N, K, k_tiles_per_split, splits, eps,
                 x_stride, residual_stride, w_stride, out_stride, residual_out_stride,
                 PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SPLIT: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 NUM_STAGES: tl.constexpr):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.arange(0, ROWS)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * w_stride
    acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
    sumsq = tl.zeros([ROWS], tl.float32)
    k_tile_begin = split * k_tiles_per_split
    k_tile_end = tl.minimum(k_tile_begin + k_tiles_per_split, tl.cdiv(K, BLOCK_K))
    # NOTE: k from a tile index (k_tile * BLOCK_K) so the compiler sees its alignment: vector loads.
    for k_tile in tl.range(k_tile_begin, k_tile_end, num_stages=NUM_STAGES):
        k = k_tile * BLOCK_K + tl.arange(0, BLOCK_K)
        x, sumsq = _operand(x_ptr, residual_ptr, norm_weight_ptr, residual_out_ptr, rows, k, n_rows, K,
                            x_stride, residual_stride, residual_out_stride, tile == 0, sumsq, PROLOGUE, HAS_RESIDUAL)
        w = tl.load(w_rows + k[None, :], mask=(cols < N)[:, None] & (k < K)[None, :], other=0.0)
        acc += dot(x.to(w.dtype), tl.trans(w))
    if SPLIT:
        # partials [splits, M, N] and, per N tile, sum(r^2) [tiles, splits, M]; the last split merges them
        row_mask = rows < n_rows
        part_mask = row_mask[:, None] & (cols < N)[None, :]
        part = part_ptr + rows[:, None] * N + cols[None, :]
        sumsq_part = part_sumsq_ptr + tile * splits * n_rows + rows
        tl.store(part + split * n_rows * N, acc, mask=part_mask)
        tl.store(sumsq_part + split * n_rows, sumsq, mask=row_mask)
        if last_arrival(counter_ptr + tile, splits):
            acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
            sumsq = tl.zeros([ROWS], tl.float32)
            for s in range(splits):
                acc += tl.load(part + s * n_rows * N, mask=part_mask, other=0.0, cache_modifier=".cg")
                sumsq += tl.load(sumsq_part + s * n_rows, mask=row_mask, other=0.0, cache_modifier=".cg")
            _epilogue(acc, sumsq, rows, cols, n_rows, N, K, eps, bias_ptr, out_ptr, out_stride, PROLOGUE == NORM,
                      HAS_BIAS)
    else:
        _epilogue(acc, sumsq, rows, cols, n_rows, N, K, eps, bias_ptr, out_ptr, out_stride, PROLOGUE == NORM, HAS_BIAS)


def load_gemv_configs(path, replace: bool = True) -> int:
    """Installs per-shape GEMV choices from a JSON list of {"rows", "n", "k"} (optional "dtype", default
    "bfloat16") plus any of TUNABLE (positive ints; BLOCK_N, BLOCK_K and NUM_WARPS powers of two, the blocks
    at least MIN_BLOCK); returns how many. `replace=False` keeps entries already installed. Errors name the
    file and the entry; nothing is installed from a file with an error."""
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"GEMV configs {path}: {e}") from None
    if not isinstance(entries, list):
        raise ValueError(f"GEMV configs {path}: expected a JSON list of entries")
    configs = {}
    for i, entry in enumerate(entries):
        values = entry if isinstance(entry, dict) else {}
        keys = set(values) - {"rows", "n", "k", "dtype"}
        shape = [values.get(k) for k in ("rows", "n", "k")]
        dtype = values.get("dtype", "bfloat16")
        positive = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0  # noqa: E731
        bad = [k for k in keys if k not in TUNABLE or not positive(values[k])
               or (k in POWERS_OF_TWO and values[k] & (values[k] - 1))
               or (k in ("BLOCK_N", "BLOCK_K") and values[k] < MIN_BLOCK)]
        if not all(positive(v) for v in shape) or dtype not in ("bfloat16", "float16", "float32") or bad:
            raise ValueError(f"GEMV configs {path}, entry {i}: expected positive ints rows, n, k, a dtype name and "
                             f"any of {', '.join(TUNABLE)} (positive ints; powers of two for "
                             f"{', '.join(POWERS_OF_TWO)}; blocks >= {MIN_BLOCK}); got {entry!r}")
        configs[(*shape, dtype)] = {k: values[k] for k in keys}
    for key, config in configs.items():
        if replace or key not in GEMV_CONFIGS:
            GEMV_CONFIGS[key] = config
    return len(configs)


def _config(rows: int, N: int, K: int, dtype: torch.dtype) -> dict[str, int]:
    global _configs_from_env
    if not _configs_from_env and os.environ.get("RSTITCH_GEMV_CONFIGS"):
        load_gemv_configs(os.environ["RSTITCH_GEMV_CONFIGS"], replace=False)
    _configs_from_env = True  # NOTE: after the load: a bad file raises at every launch, naming itself
    return GEMV_CONFIGS.get((rows, N, K, str(dtype).removeprefix("torch.")), {})


def _default_splits(n_tiles: int, k_tiles: int, device: torch.device) -> int:
    sms = num_sms(device)
    if n_tiles >= MIN_TILES_PER_SM * sms:
        return 1
    return min(triton.cdiv(SPLIT_PROGRAMS_PER_SM * sms, n_tiles), k_tiles)


def _gemv(x, weight, out, prologue, K, residual=None, norm_weight=None, residual_out=None, bias=None, eps=0.0,
          num_splits=None):
    """Launch y = prologue(x) @ weight^T (+ epilogue) into out [M, N]; x [M, K] (silu: [M, 2K])."""
    n_rows, N = out.shape
    assert n_rows <= MAX_ROWS, f"skinny GEMM kernels take at most {MAX_ROWS} rows, got {n_rows}"
    assert weight.shape[1] == K and x.dtype == weight.dtype
    for t in (x, weight, out, residual, residual_out):
        assert t is None or t.stride(-1) == 1
    if n_rows == 0:
        return out
    rows = max(MIN_ROWS, triton.next_power_of_2(n_rows))
    config = _config(rows, N, K, weight.dtype)
    block_n, block_k = config.get("BLOCK_N", BLOCK_N), config.get("BLOCK_K", BLOCK_K)
    n_tiles, k_tiles = triton.cdiv(N, block_n), triton.cdiv(K, block_k)
    splits = num_splits if num_splits is not None else \
        config.get("SPLITS") or _default_splits(n_tiles, k_tiles, x.device)
    k_tiles_per_split = triton.cdiv(k_tiles, max(1, min(splits, k_tiles)))
    splits = triton.cdiv(k_tiles, k_tiles_per_split)
    part = part_sumsq = counters = out
    if splits > 1:
        part = torch.empty((splits, n_rows, N), dtype=torch.float32, device=x.device)
        part_sumsq = torch.empty((n_tiles, splits, n_rows), dtype=torch.float32, device=x.device)
        counters = arrival_counters(x.device, n_tiles)
    # absent operands: any tensor of the right kind, never read (constexpr flags)
    residual_ = residual if residual is not None else x
    residual_out_ = residual_out if residual_out is not None else x
    _gemv_kernel[(n_tiles, splits)](
        x, residual_, norm_weight if norm_weight is not None else weight, weight, bias if bias is not None else weight,
        out, residual_out_, part, part_sumsq, counters, n_rows, N, K, k_tiles_per_split, splits, eps,
        x.stride(0), residual_.stride(0), weight.stride(0), out.stride(0), residual_out_.stride(0),
        PROLOGUE=prologue, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, SPLIT=splits > 1,
        ROWS=rows, BLOCK_N=block_n, BLOCK_K=block_k, NUM_STAGES=config.get("NUM_STAGES", NUM_STAGES),
        num_warps=config.get("NUM_WARPS", NUM_WARPS))
    return out


def _out(x, weight, out):
    return torch.empty((x.shape[0], weight.shape[0]), dtype=weight.dtype, device=x.device) if out is None else out


def norm_linear(h, residual, norm_weight, weight, bias, eps: float, out=None, num_splits=None):
    """h [M, K] (+ residual [M, K]) -> (y [M, N] in `out`, r): r = h + residual, or h itself without a
    residual. `num_splits` (split-K) is chosen from the shapes and the device when None."""
    residual_out = h if residual is None else torch.empty(h.shape, dtype=h.dtype, device=h.device)
    y = _gemv(h, weight, _out(h, weight, out), NORM, h.shape[1], residual=residual, norm_weight=norm_weight,
              residual_out=None if residual is None else residual_out, bias=bias, eps=eps, num_splits=num_splits)
    return y, residual_out


def linear(x, weight, out=None, num_splits=None):
    """x [M, K] -> y = x @ weight^T, in `out`."""
    return _gemv(x, weight, _out(x, weight, out), PLAIN, x.shape[1], num_splits=num_splits)


def silu_mul_linear(gate_up, weight, out=None, num_splits=None):
    """gate_up [M, 2I] -> y = (silu(gate_up[:, :I]) * gate_up[:, I:]) @ weight^T, weight [N, I]."""
    assert gate_up.shape[1] == 2 * weight.shape[1]
    return _gemv(gate_up, weight, _out(gate_up, weight, out), SILU_MUL, weight.shape[1], num_splits=num_splits)


# ---------------------------------------------------------------- the unfused compositions


def _into(out, y):
    return y if out is None else out.copy_(y)


def unfused_norm_linear(rms_norm, h, residual, norm_weight, weight, bias, eps: float, linear=F.linear):
    """`rms_norm` (the Triton kernel or its reference, + residual) then `linear` (F.linear's signature)."""
    if residual is None:
        return linear(rms_norm(h, norm_weight, eps), weight, bias), h
    x, residual_out = rms_norm(h, norm_weight, eps, residual)
    return linear(x, weight, bias), residual_out


def unfused_silu_mul_linear(silu_and_mul, gate_up, weight, linear=F.linear):
    return linear(silu_and_mul(gate_up), weight)


def norm_linear_ref(h, residual, norm_weight, weight, bias, eps: float, out=None, num_splits=None):
    """Plain torch: rms_norm_ref then F.linear. `num_splits` is ignored."""
    y, residual_out = unfused_norm_linear(rms_norm_ref, h, residual, norm_weight, weight, bias, eps)
    return _into(out, y), residual_out


def linear_ref(x, weight, out=None, num_splits=None):
    """Plain torch: F.linear."""
    return _into(out, F.linear(x, weight))


def silu_mul_linear_ref(gate_up, weight, out=None, num_splits=None):
    """Plain torch: silu_and_mul_ref then F.linear."""
    return _into(out, unfused_silu_mul_linear(silu_and_mul_ref, gate_up, weight))
