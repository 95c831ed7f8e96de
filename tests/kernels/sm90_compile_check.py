"""Compile every kernel for an H100/H200 (sm_90a) on a machine without a GPU, through the real launchers.

Triton's compiler and ptxas need no device: a stand-in driver reports the target, and launches are
turned into compile-only warm-ups. Each launcher runs on CPU tensors of the benchmark shapes, so the
argument specialisation (alignment, divisibility by 16) is the one a GPU run would see. Prints each
kernel's registers, spills and shared memory from the cubin.

    python tests/kernels/sm90_compile_check.py      (TRITON_INTERPRET must be unset)
Exit status: 0 compiled, 1 a kernel failed to compile, 2 this triton cannot be driven this way.
"""
import os
import re
import subprocess
import sys
import traceback

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

TARGET = GPUTarget("cuda", 90, 32)


class StandInCudaDriver:
    def get_current_target(self):
        return TARGET

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def install_compile_only_launches(compiled):
    launch = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kwargs, kernel))
        return kernel

    JITFunction.run = compile_only


def compile_noise_streams():
    """The hash with the large stream constants of speculative decoding (streams 1 and 2)."""
    import triton.language as tl

    from rstitch_engine.kernels.random import gumbel_from_hash, hash_u32

    @triton.jit
    def noise_kernel(seed_ptr, pos_ptr, out_ptr, STREAM: tl.constexpr):
        cols = tl.arange(0, 128)
        h = hash_u32(tl.load(seed_ptr), tl.load(pos_ptr), cols, STREAM)
        tl.store(out_ptr + cols, gumbel_from_hash(h))

    for stream in (1, 2):
        noise_kernel[(1,)](torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int32), torch.zeros(128),
                           STREAM=stream)


def run_launchers():
    import rstitch_engine.kernels as K
    from rstitch_engine.kernels import decode_attention as common  # its num_sms: the one the launcher reads

    compile_noise_streams()

    bf16 = torch.bfloat16
    for n_rows, splits in [(1, None), (256, 1), (64, 3)]:
        logits = torch.randn(n_rows, 152064).to(bf16)
        rows = torch.zeros(n_rows)
        ints = torch.zeros(n_rows, dtype=torch.int32)
        for is_llm, table in [(0, None), (1, torch.zeros(8, 64, dtype=torch.int32))]:
            K.stitch_step(logits, 151936, temperature=rows, cutoff=rows, seed=ints.long(), sample_pos=ints,
                          tau_up=rows, tau_down=rows, is_llm=is_llm, token_table=table, out_slot=ints,
                          out_pos=ints, num_splits=splits, nonfinite_slots=ints if is_llm else None)
    for hq, hkv in [(28, 4), (12, 2)]:
        k_cache = torch.zeros(64, 16, hkv, 128, dtype=bf16)
        tables = torch.zeros(32, 64, dtype=torch.int32)
        slots = torch.arange(32, dtype=torch.int32)
        q = torch.zeros(32, hq, 128, dtype=bf16)
        for splits in (1, 4):
            K.paged_decode_attention(q, k_cache, k_cache, tables, slots, slots, 0.1, num_splits=splits)
        K.paged_extend_attention(q, k_cache, k_cache, tables, slots, torch.arange(33, dtype=torch.int32), slots,
                                 0.1, 1)
        K.store_kv(q[:, :hkv], q[:, :hkv], k_cache, k_cache, slots)
        K.apply_rotary(q, q[:, :hkv], slots, torch.zeros(4096, 128))
    # H200 settings: 132 SMs and a graph's block table spanning max_model_len (131072 positions, page 16),
    # batch 1, the splits chosen by the launcher
    common.num_sms = lambda device: 132
    for hq, hkv in [(12, 2), (28, 4)]:
        q = torch.zeros(1, hq, 128, dtype=bf16)
        k_cache = torch.zeros(64, 16, hkv, 128, dtype=bf16)
        one = torch.zeros(1, dtype=torch.int32)
        K.paged_decode_attention(q, k_cache, k_cache, torch.zeros(1, 131072 // 16, dtype=torch.int32), one, one, 0.1)
    for dtype, hq, hkv, head_dim in [(torch.float32, 4, 2, 8), (bf16, 4, 1, 16), (bf16, 4, 1, 80)]:
        # the tiny test pair's shapes (head dims 8 and 16: tiles padded to tl.dot's K >= 16) and a head dim
        # that is not a power of two
        k_cache = torch.zeros(16, 4, hkv, head_dim, dtype=dtype)
        tables, slots = torch.zeros(4, 16, dtype=torch.int32), torch.arange(4, dtype=torch.int32)
        q = torch.zeros(4, hq, head_dim, dtype=dtype)
        for splits in (1, 3):
            K.paged_decode_attention(q, k_cache, k_cache, tables, slots, slots, 0.1, num_splits=splits)
        K.paged_extend_attention(q, k_cache, k_cache, tables, slots, torch.arange(5, dtype=torch.int32), slots,
                                 0.1, 1)
    for hidden in (1536, 3584):
        x = torch.zeros(32, hidden, dtype=bf16)
        K.rms_norm(x, x[0], 1e-6)
        K.rms_norm(x, x[0], 1e-6, residual=x)
        K.silu_and_mul(torch.zeros(32, 2 * hidden, dtype=bf16))
    K.rms_norm(torch.zeros(32 * 28, 128, dtype=bf16), torch.zeros(128, dtype=bf16), 1e-6)
    for hidden in (1536, 3584):  # the step's first and last ops: embedding with NaN tracking, final norm
        embed, ints = torch.zeros(151936, hidden, dtype=bf16), torch.zeros(8, dtype=torch.int32)
        table = torch.zeros(64 * 1024, dtype=torch.int32)
        K.embed_tokens(embed, ints, ints, table)
        K.embed_tokens(embed, ints, ints, table, query_start_loc=torch.arange(9, dtype=torch.int32), seq_slot=ints,
                       token_slot=ints)
        x = torch.zeros(8, hidden, dtype=bf16)
        K.rms_norm_rows(x, x[0], 1e-6, x, ints[:1])
        K.rms_norm_rows(x, x[0], 1e-6, x, ints)
    run_fused_launchers()


def run_fused_launchers():
    """The decode layer's fused kernels at the 1.5B and 7B shapes; n_rows 1 is its own specialisation."""
    from rstitch_engine.kernels import fused_linear as FL
    from rstitch_engine.kernels.rope_store import rope_store

    bf16 = torch.bfloat16
    for hidden, qkv, ffn, hq, hkv in [(1536, 2048, 8960, 12, 2), (3584, 4608, 18944, 28, 4)]:
        norm_weight, bias = torch.empty(hidden, dtype=bf16), torch.empty(qkv, dtype=bf16)
        qkv_w, o_w = torch.empty(qkv, hidden, dtype=bf16), torch.empty(hidden, hidden, dtype=bf16)
        gate_up_w, down_w = torch.empty(2 * ffn, hidden, dtype=bf16), torch.empty(hidden, ffn, dtype=bf16)
        for rows in (1, 16):
            h = torch.empty(rows, hidden, dtype=bf16)
            for splits in (None, 4):
                FL.norm_linear(h, h, norm_weight, qkv_w, bias, 1e-6, num_splits=splits)
                FL.norm_linear(h, None, norm_weight, gate_up_w, None, 1e-6, num_splits=splits)
                FL.linear(h, o_w, num_splits=splits)
                FL.silu_mul_linear(torch.empty(rows, 2 * ffn, dtype=bf16), down_w, num_splits=splits)
        q = torch.empty(32, hq + 2 * hkv, 128, dtype=bf16)
        k_cache = torch.empty(64, 16, hkv, 128, dtype=bf16)
        slots = torch.arange(32, dtype=torch.int32)
        for nonfinite in (None, (slots, slots)):
            rope_store(q[:, :hq], q[:, hq:hq + hkv], q[:, hq + hkv:], slots, torch.empty(4096, 128), k_cache,
                       k_cache, slots, nonfinite=nonfinite)


def resource_usage(cubin: bytes, workdir: str) -> str:
    path = os.path.join(workdir, "kernel.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    text = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    return "regs={} stack={} local={}".format(found[1], found[2], found[4]) if found else "(no resource report)"


def main() -> int:
    if triton.knobs.runtime.interpret:
        print("TRITON_INTERPRET is set: nothing to compile")
        return 2
    compiled = []
    try:
        driver.set_active(StandInCudaDriver())
        install_compile_only_launches(compiled)
    except Exception:  # noqa: BLE001 - a different triton internals layout
        traceback.print_exc()
        return 2
    try:
        run_launchers()
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return 1
    import tempfile
    with tempfile.TemporaryDirectory() as workdir:
        for name, kwargs, kernel in compiled:
            consts = {k: v for k, v in kwargs.items() if k.isupper() and k not in ("HEAD_DIM",)}
            meta = kernel.metadata
            print(f"{name:24s} warps={meta.num_warps} stages={meta.num_stages} smem={meta.shared} "
                  f"{resource_usage(kernel.asm['cubin'], workdir)} {consts}")
    print(f"{len(compiled)} launches compiled for sm_90a")
    return 0


if __name__ == "__main__":
    sys.exit(main())
