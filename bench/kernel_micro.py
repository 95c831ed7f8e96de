"""Kernel benchmarks: each Triton kernel against its plain-torch version, on a CUDA device.

    python bench/kernel_micro.py [--quick] [--sweep]

Every op is timed as CUDA-graph replays (launch gaps removed, as in the engine's decode loop), over
enough rotated input sets to overflow L2, median of several replays. The device's copy bandwidth is
measured first (large device-to-device copy, bytes read + written); each case reports time, the
bandwidth achieved on the bytes the kernel must move (inputs read once, outputs written once), its
share of the copy bandwidth and the speed-up over torch. Results go to
bench/results/kernels-<device>-<date>.json and .md. --sweep also times stitch_step, decode
attention and the fused skinny GEMMs under alternative tuning constants (written to the JSON, one line
each printed). Fused GEMM rows also time cuBLAS F.linear alone; decoder-layer rows give the device
kernels per layer of the fused and the unfused forward (profiler count).
Without CUDA it prints a message and exits 0.
"""
import argparse
import importlib
import datetime
import json
import math
import platform
import re
import statistics
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
GRAPH_REPLAYS = 15
DEVICE = "cuda"  # where cases build their inputs; the CPU test of the case builders sets "cpu"


# ---------------------------------------------------------------- timing

def _side_stream_warmup(calls):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()


def graph_time_us(calls, min_calls=16):
    """Median time of one call, replaying a CUDA graph that runs the calls (one per input set) in turn."""
    _side_stream_warmup(calls)
    repeat = max(1, math.ceil(min_calls / len(calls)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            for call in calls:
                call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(GRAPH_REPLAYS):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (repeat * len(calls)))
    del graph
    return statistics.median(times)


def input_sets(bytes_per_set, build, l2_bytes, most=16):
    """Enough independent input sets that cycling through them overflows L2 (3x)."""
    n = max(1, min(most, math.ceil(3 * l2_bytes / max(bytes_per_set, 1))))
    return [build(i) for i in range(n)]


# ---------------------------------------------------------------- cases

def _gen(i):
    return torch.Generator(device=DEVICE).manual_seed(1000 + i)


def stitch_cases(n_rows_list, sampled):
    import rstitch_engine.kernels as K

    vocab, vocab_limit = 152064, 151936
    for n_rows in n_rows_list:
        def build(i, n_rows=n_rows):
            g = _gen(i)
            logits = (torch.randn(n_rows, vocab, device=DEVICE, generator=g) * 3).to(torch.bfloat16)
            f32 = lambda v: torch.full((n_rows,), v, device=DEVICE)  # noqa: E731
            return dict(logits=logits, vocab_limit=vocab_limit, temperature=f32(0.7 if sampled else 0.0),
                        cutoff=f32(float("-inf")), seed=torch.arange(n_rows, device=DEVICE) + i,
                        sample_pos=torch.zeros(n_rows, dtype=torch.int32, device=DEVICE),
                        tau_up=f32(0.5), tau_down=f32(0.3), is_llm=0)

        def torch_greedy(a):
            logp = torch.log_softmax(a["logits"].float(), dim=-1)
            entropy = -(logp.exp() * logp).sum(-1) / math.log(vocab)
            return a["logits"][:, :vocab_limit].argmax(-1), entropy

        baseline = ((lambda a: K.stitch_step_ref(**a)), "stitch_step_ref") if sampled \
            else (torch_greedy, "log_softmax+entropy+argmax")
        name = "stitch_step sampled T=0.7" if sampled else "stitch_step greedy"
        yield dict(name=name, shape=f"L={n_rows} V={vocab} bf16", bytes=n_rows * vocab * 2 + n_rows * 12,
                   build=build, triton=lambda a: K.stitch_step(**a), torch=baseline[0], torch_name=baseline[1],
                   check=lambda a: _check_stitch(K, a))


def _check_stitch(K, a):
    tokens, entropy, _ = K.stitch_step(**a)
    ref_tokens, ref_entropy, _ = K.stitch_step_ref(**a)
    return max(float((tokens != ref_tokens).float().mean()), _rel(entropy, ref_entropy))


def decode_cases(contexts, head_configs, batch=32, page=16, head_dim=128):
    import rstitch_engine.kernels as K

    for context in contexts:
        if context % page:
            raise ValueError(f"decode case: context {context} must be a multiple of the page size {page}")
        for num_q_heads, num_kv_heads in head_configs:
            blocks_per_seq = context // page

            def build(i, context=context, hq=num_q_heads, hkv=num_kv_heads, bps=blocks_per_seq):
                g = _gen(i)
                pool = torch.randn(2, batch * bps, page, hkv, head_dim, device=DEVICE, generator=g).to(torch.bfloat16)
                tables = torch.randperm(batch * bps, device=DEVICE, generator=g).int().view(batch, bps)
                seq_lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
                q = torch.randn(batch, hq, head_dim, device=DEVICE, generator=g).to(torch.bfloat16)
                return (q, pool[0], pool[1], tables, torch.arange(batch, dtype=torch.int32, device=DEVICE),
                        seq_lens, head_dim ** -0.5)

            kv_bytes = 2 * batch * context * num_kv_heads * head_dim * 2
            yield dict(name="paged_decode_attention", shape=f"B={batch} ctx={context} Hq={num_q_heads} "
                       f"Hkv={num_kv_heads} D={head_dim} page={page} bf16",
                       bytes=kv_bytes + 2 * batch * num_q_heads * head_dim * 2 + batch * blocks_per_seq * 4,
                       build=build, triton=lambda a: K.paged_decode_attention(*a),
                       torch=lambda a: K.paged_decode_attention_ref(*a), torch_name="paged_decode_attention_ref",
                       check=lambda a: _rel(K.paged_decode_attention(*a), K.paged_decode_attention_ref(*a)))


MODEL_SHAPES = {1536: dict(hq=12, hkv=2, inter=8960), 3584: dict(hq=28, hkv=4, inter=18944)}


def elementwise_cases(token_counts):
    import rstitch_engine.kernels as K

    bf16 = torch.bfloat16
    for hidden, m in MODEL_SHAPES.items():
        for tokens in token_counts:
            def norm_build(i, tokens=tokens, hidden=hidden):
                g = _gen(i)
                x, res = (torch.randn(tokens, hidden, device=DEVICE, generator=g).to(bf16) for _ in range(2))
                return x, torch.randn(hidden, device=DEVICE, generator=g).to(bf16), 1e-6, res

            yield dict(name="rms_norm", shape=f"T={tokens} H={hidden} bf16", bytes=2 * tokens * hidden * 2 + hidden * 2,
                       build=norm_build, triton=lambda a: K.rms_norm(*a[:3]), torch=lambda a: K.rms_norm_ref(*a[:3]),
                       torch_name="rms_norm_ref", check=lambda a: _rel(K.rms_norm(*a[:3]), K.rms_norm_ref(*a[:3])))
            yield dict(name="rms_norm+residual", shape=f"T={tokens} H={hidden} bf16",
                       bytes=4 * tokens * hidden * 2 + hidden * 2, build=norm_build,
                       triton=lambda a: K.rms_norm(*a[:3], residual=a[3]),
                       torch=lambda a: K.rms_norm_ref(*a[:3], residual=a[3]), torch_name="rms_norm_ref",
                       check=lambda a: _rel(K.rms_norm(*a[:3], residual=a[3])[0],
                                            K.rms_norm_ref(*a[:3], residual=a[3])[0]))

            def rope_build(i, tokens=tokens, hq=m["hq"], hkv=m["hkv"]):
                g = _gen(i)
                qkv = torch.randn(tokens, (hq + 2 * hkv) * 128, device=DEVICE, generator=g).to(bf16)
                q = qkv[:, :hq * 128].view(tokens, hq, 128)
                k = qkv[:, hq * 128:(hq + hkv) * 128].view(tokens, hkv, 128)
                cache = torch.randn(32768, 128, device=DEVICE, generator=g)
                return q, k, torch.randint(0, 32768, (tokens,), device=DEVICE, generator=g).int(), cache

            rope_bytes = 2 * tokens * (m["hq"] + m["hkv"]) * 128 * 2 + tokens * 128 * 4
            yield dict(name="apply_rotary", shape=f"T={tokens} Hq={m['hq']} Hkv={m['hkv']} D=128 bf16",
                       bytes=rope_bytes, build=rope_build, triton=lambda a: K.apply_rotary(*a),
                       torch=lambda a: K.apply_rotary_ref(*a), torch_name="apply_rotary_ref", check=None)

            def act_build(i, tokens=tokens, inter=m["inter"]):
                return (torch.randn(tokens, 2 * inter, device=DEVICE, generator=_gen(i)).to(bf16),)

            yield dict(name="silu_and_mul", shape=f"T={tokens} I={m['inter']} bf16", bytes=3 * tokens * m["inter"] * 2,
                       build=act_build, triton=lambda a: K.silu_and_mul(*a), torch=lambda a: K.silu_and_mul_ref(*a),
                       torch_name="silu_and_mul_ref", check=lambda a: _rel(K.silu_and_mul(*a), K.silu_and_mul_ref(*a)))


REAL_MODELS = {"1.5B": "1.5b", "7B": "7b"}  # rstitch_engine.random_models.SHAPES (the CPU test: "tiny")


def _gemv_case(name, model, m, n, k, fused, unfused, unfused_name, cublas, ref, extra_bytes=0, x_cols=None):
    """One skinny GEMM case; inputs a dict: x [m, x_cols or k], act [m, k], res [m, k], nw [k], w [n, k],
    b [n]. Bytes: weight, x and output once, plus `extra_bytes` elements."""
    def build(i):
        g = _gen(i)
        rand = lambda *shape: torch.randn(*shape, device=DEVICE, generator=g).to(torch.bfloat16)  # noqa: E731
        return dict(x=rand(m, x_cols or k), act=rand(m, k), res=rand(m, k), nw=rand(k), w=rand(n, k) * 0.02,
                    b=rand(n))

    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    return dict(name=name, shape=f"M={m} N={n} K={k} bf16 ({model})",
                bytes=2 * (n * k + m * (x_cols or k) + m * n + extra_bytes), build=build, triton=fused,
                torch=unfused, torch_name=unfused_name, cublas=cublas, gemv=(m, n, k),
                check=lambda a: _rel(first(fused(a)), first(ref(a))))


def fused_cases(row_counts):
    """The fused skinny GEMMs of a decode layer against the unfused composition the engine uses above
    ops.FUSED_MAX_ROWS (cuBLAS F.linear + the norm / activation kernels); `cublas` times F.linear alone.
    Then rope_store against apply_rotary + store_kv."""
    import torch.nn.functional as F

    import rstitch_engine.kernels as K
    from rstitch_engine.kernels import fused_linear as FL
    from rstitch_engine.random_models import SHAPES

    eps = 1e-6
    for model, key in REAL_MODELS.items():
        cfg = SHAPES[key]
        H, I, hq, hkv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads
        qkv = cfg.q_size + 2 * cfg.kv_size
        for m in row_counts:
            yield _gemv_case(
                "norm_linear qkv (+res, bias)", model, m, qkv, H,
                lambda a: FL.norm_linear(a["x"], a["res"], a["nw"], a["w"], a["b"], eps),
                lambda a: FL.unfused_norm_linear(K.rms_norm, a["x"], a["res"], a["nw"], a["w"], a["b"], eps),
                "rms_norm + F.linear", lambda a: F.linear(a["x"], a["w"], a["b"]),
                lambda a: FL.norm_linear_ref(a["x"], a["res"], a["nw"], a["w"], a["b"], eps),
                extra_bytes=2 * m * H + H + qkv)
            yield _gemv_case(
                "norm_linear gate_up (+res)", model, m, 2 * I, H,
                lambda a: FL.norm_linear(a["x"], a["res"], a["nw"], a["w"], None, eps),
                lambda a: FL.unfused_norm_linear(K.rms_norm, a["x"], a["res"], a["nw"], a["w"], None, eps),
                "rms_norm + F.linear", lambda a: F.linear(a["x"], a["w"]),
                lambda a: FL.norm_linear_ref(a["x"], a["res"], a["nw"], a["w"], None, eps), extra_bytes=2 * m * H + H)
            yield _gemv_case(  # as the decoder calls it: the residual joins in the next norm_linear
                "linear o_proj", model, m, H, cfg.q_size,
                lambda a: FL.linear(a["x"], a["w"]), lambda a: F.linear(a["x"], a["w"]),
                "F.linear", None, lambda a: FL.linear_ref(a["x"], a["w"]))
            yield _gemv_case(
                "silu_mul_linear down", model, m, H, I,
                lambda a: FL.silu_mul_linear(a["x"], a["w"]),
                lambda a: FL.unfused_silu_mul_linear(K.silu_and_mul, a["x"], a["w"]),
                "silu_and_mul + F.linear", lambda a: F.linear(a["act"], a["w"]),
                lambda a: FL.silu_mul_linear_ref(a["x"], a["w"]), x_cols=2 * I)

            def rope_build(i, m=m, hq=hq, hkv=hkv, page=16):
                g = _gen(i)
                qkv_out = torch.randn(m, (hq + 2 * hkv) * 128, device=DEVICE, generator=g).to(torch.bfloat16)
                pool = torch.randn(2, 4096, page, hkv, 128, device=DEVICE, generator=g).to(torch.bfloat16)
                q, k, v = qkv_out.split([hq * 128, hkv * 128, hkv * 128], dim=-1)
                return (q.view(m, hq, 128), k.view(m, hkv, 128), v.view(m, hkv, 128),
                        torch.randint(0, 32768, (m,), device=DEVICE, generator=g).int(),
                        torch.randn(32768, 128, device=DEVICE, generator=g), pool[0], pool[1],
                        torch.randperm(4096 * page, device=DEVICE, generator=g)[:m].int())

            def rope_unfused(a):
                K.apply_rotary(*a[:2], *a[3:5])
                K.store_kv(a[1], a[2], *a[5:])

            yield dict(name="rope_store", shape=f"T={m} Hq={hq} Hkv={hkv} D=128 bf16", build=rope_build,
                       bytes=2 * m * (hq + 2 * hkv) * 128 * 2 + m * 128 * 4,
                       triton=lambda a: K.rope_store(*a), torch=rope_unfused, torch_name="apply_rotary + store_kv",
                       check=None)


def decode_layer_cases(row_counts, context=1024, layers=8, page=16):
    """Decoder layers through the engine's forward (embedding and final norm included), as CUDA-graph
    replays: the fused path (every GEMM fused, FUSED_MAX_ROWS raised to 16) against the unfused one
    (FUSED_MAX_ROWS = 0, and rope + KV store as the two kernels the forward used before). `layers`
    layers of distinct weights overflow L2; `kernels` counts device kernels per layer with a profiler."""
    import dataclasses

    from rstitch_engine.engine import ops as O
    from rstitch_engine.kernels import apply_rotary, store_kv
    from rstitch_engine.models.decoder import ModelWeights, forward
    from rstitch_engine.models.rope import cos_sin_table
    from rstitch_engine.random_models import SHAPES, random_weights

    bf16 = torch.bfloat16
    for model, key in REAL_MODELS.items():
        cfg = dataclasses.replace(SHAPES[key], vocab_size=1024, num_layers=layers)
        for m in row_counts:
            def build(i, cfg=cfg, m=m):
                w = random_weights(cfg, bf16, DEVICE, seed=i)
                blocks = context // page
                pool = [torch.randn(2, m * blocks, page, cfg.num_kv_heads, cfg.head_dim, device=DEVICE).to(bf16)
                        for _ in range(layers)]
                tables = torch.arange(m * blocks, dtype=torch.int32, device=DEVICE).view(m, blocks)
                rows = torch.arange(m, dtype=torch.int32, device=DEVICE)
                meta = O.AttentionMeta(slot_mapping=rows * context + context - 1, block_tables=tables, seq_slot=rows,
                                       query_start_loc=torch.arange(m + 1, dtype=torch.int32, device=DEVICE),
                                       seq_lens=torch.full((m,), context, dtype=torch.int32, device=DEVICE),
                                       max_query_len=1, scale=cfg.head_dim ** -0.5)
                ids = torch.randint(0, cfg.vocab_size, (m,), device=DEVICE)
                positions = torch.full((m,), context - 1, dtype=torch.int32, device=DEVICE)
                return dict(cfg=cfg, w=w, caches=[(c[0], c[1]) for c in pool], meta=meta, ids=ids, positions=positions,
                            cos_sin=cos_sin_table(cfg, context, DEVICE))

            def run(a, fused, n_layers=layers):
                ops = O.Ops(triton=True)
                if not fused:
                    ops.rope_store = lambda q, k, v, pos, cs, kc, vc, sm, nonfinite=None: (
                        apply_rotary(q, k, pos, cs), store_kv(k, v, kc, vc, sm), q)[-1]
                saved, O.FUSED_MAX_ROWS = O.FUSED_MAX_ROWS, 16 if fused else 0
                try:
                    w = a["w"]
                    layers_w = ModelWeights(embed=w.embed, layers=w.layers[:n_layers], norm=w.norm, lm_head=w.lm_head)
                    return forward(a["cfg"], layers_w, ops, w.embed[a["ids"]], a["positions"], a["caches"][:n_layers],
                                   a["meta"], a["cos_sin"])
                finally:
                    O.FUSED_MAX_ROWS = saved

            layer_bytes = (cfg.q_size + 2 * cfg.kv_size) * (cfg.hidden_size + 1) + cfg.hidden_size * cfg.q_size + \
                3 * cfg.hidden_size * cfg.intermediate_size + 2 * cfg.hidden_size + 2 * m * context * cfg.kv_size
            yield dict(name="decoder layers", shape=f"{model} x{layers} layers M={m} ctx={context} bf16",
                       bytes=2 * layers * layer_bytes, build=build, layers=layers,
                       triton=lambda a, run=run: run(a, True), torch=lambda a, run=run: run(a, False),
                       torch_name="unfused (cuBLAS + norm/act kernels, rotary + store_kv)",
                       check=lambda a, run=run: _rel(run(a, True), run(a, False)),
                       kernels=lambda a, run=run: tuple(_kernels_per_layer(lambda n: run(a, fused, n), layers)
                                                        for fused in (True, False)))


def _device_ops(fn):
    """Kernels (and memsets/copies) one eager call puts on the device, counted with the profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _kernels_per_layer(run_layers, layers):
    return (_device_ops(lambda: run_layers(layers)) - _device_ops(lambda: run_layers(1))) / (layers - 1)


def _rel(out, ref):
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


# ---------------------------------------------------------------- running and reporting

def run_case(case, copy_gbs, l2_bytes):
    sets = input_sets(case["bytes"], case["build"], l2_bytes)
    row = dict(kernel=case["name"], shape=case["shape"], bytes=case["bytes"], input_sets=len(sets),
               torch_version_of_op=case["torch_name"])
    row["check_rel_err"] = case["check"](sets[0]) if case["check"] else None
    row["triton_us"] = graph_time_us([lambda a=a: case["triton"](a) for a in sets])
    try:
        row["torch_us"] = graph_time_us([lambda a=a: case["torch"](a) for a in sets])
    except Exception as exc:  # noqa: BLE001 - a baseline that cannot be captured is reported, not fatal
        row["torch_us"], row["torch_error"] = None, repr(exc)[:200]
    if case.get("cublas"):
        row["cublas_us"] = graph_time_us([lambda a=a: case["cublas"](a) for a in sets])
    if case.get("kernels"):
        row["kernels_per_layer"], row["torch_kernels_per_layer"] = case["kernels"](sets[0])
        row["triton_us_per_layer"] = row["triton_us"] / case["layers"]
    row["gbs"] = case["bytes"] / (row["triton_us"] * 1e-6) / 1e9
    row["pct_copy_bw"] = 100 * row["gbs"] / copy_gbs
    row["speedup"] = row["torch_us"] / row["triton_us"] if row["torch_us"] else None
    del sets
    torch.cuda.empty_cache()
    return row


def kernel_module(name: str):
    """The module rstitch_engine.kernels.<name>. `import rstitch_engine.kernels.stitch_step as S` would bind
    the function the package re-exports under that name, and setting constants on it changes nothing."""
    return importlib.import_module(f"rstitch_engine.kernels.{name}")


def sweep(copy_gbs, l2_bytes):
    """Alternative tuning constants for the kernels that matter most: stitch step and decode attention
    through their module constants (read at launch), the skinny GEMVs per shape through
    fused_linear.GEMV_CONFIGS, whose best entry per shape is returned for `load_gemv_configs`."""
    S, D, FL = (kernel_module(n) for n in ("stitch_step", "decode_attention", "fused_linear"))
    rows = []

    def timed(case, consts):
        sets = input_sets(case["bytes"], case["build"], l2_bytes)
        us = graph_time_us([lambda a=a: case["triton"](a) for a in sets])
        gbs = case["bytes"] / (us * 1e-6) / 1e9
        rows.append(dict(kernel=case["name"], shape=case["shape"], consts=consts, triton_us=us,
                         pct_copy_bw=100 * gbs / copy_gbs))
        print(f"sweep {case['name']:24s} {case['shape']:45s} {consts} {us:9.2f} us {100 * gbs / copy_gbs:5.1f}%")

    grid = [(S, dict(NUM_WARPS=w, NUM_STAGES=st, PROGRAMS_PER_SM=p, BYTES_PER_THREAD=b), stitch_cases([1, 256], False))
            for w in (4, 8, 16) for st in (1, 3, 4) for p in (2, 4, 8) for b in (16, 32)]
    grid += [(D, dict(BLOCK_N=n, NUM_WARPS=w, PROGRAMS_PER_SM=p), decode_cases([1024, 8192], [(28, 4)]))
             for n in (32, 64, 128) for w in (4, 8) for p in (2, 4, 8)]
    for module, consts, cases in grid:
        saved = {k: getattr(module, k) for k in consts}
        for k, v in consts.items():
            setattr(module, k, v)
        try:
            for case in cases:
                timed(case, consts)
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory for one combination
            print(f"sweep {module.__name__} {consts}: {exc!r}"[:300])
        finally:
            for k, v in saved.items():
                setattr(module, k, v)
    gemv_grid = [dict(BLOCK_N=n, BLOCK_K=k, NUM_STAGES=st) for n in (16, 32, 64) for k in (128, 256, 512)
                 for st in (3, 4, 6)]
    gemv_grid += [dict(NUM_WARPS=2), dict(NUM_WARPS=8)] + [dict(SPLITS=p) for p in (1, 2, 4, 8)]
    best = {}
    for case in (c for c in fused_cases([1, 8, 16]) if c.get("gemv")):
        m, n, k = case["gemv"]
        shape = (max(FL.MIN_ROWS, 1 << (m - 1).bit_length()), n, k, "bfloat16")  # the cases' weights
        installed = FL.GEMV_CONFIGS.get(shape)
        for consts in gemv_grid:
            FL.GEMV_CONFIGS[shape] = consts
            try:
                timed(case, consts)
                if shape not in best or rows[-1]["triton_us"] < best[shape][1]:
                    best[shape] = (consts, rows[-1]["triton_us"])
            except Exception as exc:  # noqa: BLE001
                print(f"sweep gemv {shape} {consts}: {exc!r}"[:300])
        FL.GEMV_CONFIGS.pop(shape)
        if installed is not None:
            FL.GEMV_CONFIGS[shape] = installed
    configs = [dict(rows=r, n=n, k=k, dtype=d, **consts) for (r, n, k, d), (consts, _) in sorted(best.items())]
    return rows, configs


def markdown(meta, rows):
    lines = [f"# Kernel benchmarks: {meta['device']}", "",
             f"{meta['date']}, torch {meta['torch']}, triton {meta['triton']}; "
             f"copy bandwidth {meta['copy_gbs']:.0f} GB/s (read + write); CUDA-graph replays, median.", "",
             "| kernel | shape | Triton us | GB/s | % copy BW | torch us | speed-up | torch version | rel err | "
             "cuBLAS GEMM alone us | kernels/layer Triton (torch) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        torch_us = f"{r['torch_us']:.2f}" if r["torch_us"] else "n/a"
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] else "n/a"
        err = f"{r['check_rel_err']:.1e}" if r["check_rel_err"] is not None else ""
        cublas = f"{r['cublas_us']:.2f}" if r.get("cublas_us") else ""
        kernels = f"{r['kernels_per_layer']:g} ({r['torch_kernels_per_layer']:g})" if "kernels_per_layer" in r else ""
        lines.append(f"| {r['kernel']} | {r['shape']} | {r['triton_us']:.2f} | {r['gbs']:.0f} | "
                     f"{r['pct_copy_bw']:.1f} | {torch_us} | {speedup} | {r['torch_version_of_op']} | {err} | "
                     f"{cublas} | {kernels} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases (one per kernel family)")
    parser.add_argument("--sweep", action="store_true", help="also sweep tuning constants")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the results (default bench/results)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernel_micro.py: no CUDA device here, nothing to measure; run it on a GPU machine.")
        return 0
    import triton

    from rstitch_engine.bench import copy_bandwidth

    props = torch.cuda.get_device_properties(0)
    copy_gbs = copy_bandwidth("cuda") / 1e9
    now = datetime.datetime.now()
    meta = dict(device=props.name, sms=props.multi_processor_count, l2_bytes=props.L2_cache_size,
                torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                date=now.isoformat(timespec="seconds"), copy_gbs=copy_gbs)
    print(f"{props.name}: copy bandwidth {copy_gbs:.0f} GB/s")
    if args.quick:
        cases = [*stitch_cases([1, 256], False), *decode_cases([1024], [(28, 4)]), *elementwise_cases([32]),
                 *fused_cases([1]), *decode_layer_cases([1])]
    else:
        cases = [*stitch_cases([1, 8, 64, 256], False), *stitch_cases([1, 256], True),
                 *decode_cases([1024, 8192], [(28, 4), (12, 2)]), *elementwise_cases([1, 32, 256]),
                 *fused_cases([1, 4, 8, 16]), *decode_layer_cases([1, 4, 8, 16])]
    rows = []
    for case in cases:
        row = run_case(case, copy_gbs, props.L2_cache_size)
        rows.append(row)
        torch_us = f"{row['torch_us']:9.2f}" if row["torch_us"] else "      n/a"
        extra = f"  cuBLAS alone {row['cublas_us']:.2f} us" if "cublas_us" in row else ""
        if "kernels_per_layer" in row:
            extra += f"  kernels/layer {row['kernels_per_layer']:g} (torch {row['torch_kernels_per_layer']:g})"
        print(f"{row['kernel']:26s} {row['shape']:45s} {row['triton_us']:9.2f} us {row['gbs']:7.0f} GB/s "
              f"{row['pct_copy_bw']:5.1f}%  torch {torch_us} us{extra}")
    result = dict(meta=meta, cases=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"kernels-{re.sub(r'[^A-Za-z0-9]+', '-', props.name).strip('-')}-{now:%Y-%m-%d-%H%M}"
    if args.sweep:
        result["sweep"], configs = sweep(copy_gbs, props.L2_cache_size)
        path = args.out / f"{stem}-gemv-configs.json"
        path.write_text(json.dumps(configs, indent=1))
        print(f"wrote {path}: the fastest GEMV constants per shape (RSTITCH_GEMV_CONFIGS={path} to use them)")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{stem}.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))
    print(f"wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
