"""What a catch-up extend costs against a decode step, per model, beside the floors of the same shapes
measured outside the engine, in one run (docs/benchmarks.md, 'Switch costs').

R-Stitch pays one extend per switch (the model taking over catches up on the tokens the other wrote), and on
the demo pair at tau 0.02 the runs are about two tokens long: if an extend of a few tokens costs much more
than a decode, the switches eat the gain. Per model, at one context length, for each span (1 = a decode):
  engine        one ModelRunner.run through the engine's step path (router/calibrate.py's profiler)
  forward       the engine's decoder forward + LM head alone, outside the scheduler and runner
  transformers  the same checkpoint in transformers, s new tokens over a cache of the same context
  matmuls       the layers' four weight products at s rows plus the LM head at one row, as F.linear
                (torch's default GEMM choice: the floor the engine had before engine/ops.py's cpu_linear)
  stream        the weights' bytes over this machine's measured copy bandwidth (the bandwidth floor)
each the median of --repeats after a warm-up, in milliseconds, and each span's ratio to its own decode.

    python bench/switch_costs.py --slm demo:slm --llm demo:llm --dtype float32 --out bench/results/NAME
    python bench/switch_costs.py --dry      # tiny random checkpoints, a few repeats: the CPU check CI runs
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rstitch_engine import Engine
from rstitch_engine.bench import copy_bandwidth
from rstitch_engine.engine.ops import Ops
from rstitch_engine.engine.sequence import SequenceForward
from rstitch_engine.evaluation.report import collect_meta
from rstitch_engine.protocol import LLM
from rstitch_engine.router.calibrate import Grid, profile

COLUMNS = ("model", "span", "engine_ms", "forward_ms", "transformers_ms", "matmuls_ms", "stream_ms",
           "engine_vs_decode", "forward_vs_decode", "transformers_vs_decode", "matmuls_vs_decode")


def median_ms(fn, repeats: int, warmup: int = 1) -> float:
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def weight_bytes(w) -> int:
    layers = sum(t.numel() * t.element_size() for lw in w.layers
                 for t in (lw.qkv, lw.o_proj, lw.gate_up, lw.down))
    return layers + w.lm_head.numel() * w.lm_head.element_size()


def matmuls_ms(w, span: int, repeats: int) -> float:
    """The layers' GEMMs at `span` rows and the LM head at one: no attention, norms or activations."""
    hidden, inter = w.layers[0].qkv.shape[1], w.layers[0].down.shape[1]
    x = torch.randn(span, hidden, dtype=w.embed.dtype)
    a = torch.randn(span, inter, dtype=w.embed.dtype)
    o_in = torch.randn(span, w.layers[0].o_proj.shape[1], dtype=w.embed.dtype)

    def run():
        for lw in w.layers:
            F.linear(x, lw.qkv), F.linear(o_in, lw.o_proj), F.linear(x, lw.gate_up), F.linear(a, lw.down)
        F.linear(x[-1:], w.lm_head)

    return median_ms(run, repeats)


def forward_ms(cfg, w, context: int, span: int, repeats: int) -> float:
    """The engine's decoder forward of `span` tokens over `context` cached ones in a private pool of one
    sequence, plus the LM head on the last row: the model's own cost without scheduler, runner or stitch step."""
    sequence = SequenceForward(cfg, w, Ops(triton=False), context + span)
    ids = torch.randint(0, cfg.vocab_size, (span,), dtype=torch.int32)
    last = torch.tensor([span - 1], dtype=torch.int32)
    return median_ms(lambda: sequence.logits(ids, context, last), repeats)


def transformers_ms(model, vocab: int, context: int, span: int, repeats: int) -> float:
    """transformers' model, `span` new tokens over a cache of `context`, logits of the last one."""
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache()
        model(torch.randint(0, vocab, (1, context)), past_key_values=cache, use_cache=True, logits_to_keep=1)
        new = torch.randint(0, vocab, (1, span))

        def run():
            model(new, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache.crop(-span)  # negative: drop that many (transformers 5.17 and 5.24 agree on it)

        return median_ms(run, repeats)


def measure(source: str, model_name: str, dtype: str, context: int, spans: list[int], repeats: int):
    """(rows of COLUMNS for one model, copy bandwidth in bytes/s)."""
    engine = Engine(llm=source, device="cpu", dtype=dtype, kv_cache_gb=0.5, max_model_len=context + 64,
                    max_num_batched_tokens=context)
    # engine_ms goes through the executor (profile: the engine's step timings); the bare-forward and matmul
    # columns time this in-process worker's own weights outside the engine
    runner = engine.core.executor.worker.runners[LLM]
    path, cfg, vocab = engine.paths[LLM], runner.cfg, engine.vocab_limit
    grid = Grid(new_tokens=tuple(s for s in spans if s > 1), kv_chunks=(1,), decode_kv=(context,),
                batch_sizes=(1,), warmup=1, repeats=repeats)
    timed = {t.n_inf: t.ms for t in profile(engine, grid, progress=False)}
    bandwidth = copy_bandwidth("cpu")
    stream = weight_bytes(runner.weights) / bandwidth * 1e3
    rows = []
    with torch.no_grad():
        for span in spans:
            rows.append({"model": model_name, "span": span, "engine_ms": timed[span],
                         "forward_ms": forward_ms(cfg, runner.weights, context, span, repeats),
                         "matmuls_ms": matmuls_ms(runner.weights, span, repeats), "stream_ms": stream})
    del engine, runner  # the transformers copy of the model is loaded next: never both
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    for r in rows:
        r["transformers_ms"] = transformers_ms(model, vocab, context, r["span"], repeats)
    decode = rows[0]
    for r in rows:
        for k in ("engine", "forward", "transformers", "matmuls"):
            r[f"{k}_vs_decode"] = r[f"{k}_ms"] / decode[f"{k}_ms"]
    return rows, bandwidth


def markdown(rows: list[dict], meta: dict) -> str:
    fmt = lambda v: "" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"# Switch costs: extend vs decode ({meta['date']})", "",
             f"{meta['device']}, " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + f", {meta['dtype']}, {meta['threads']} threads, context "
             f"{meta['context']}, median of {meta['repeats']}; copy bandwidth {meta['copy_gb_s']:.1f} GB/s. "
             f"Command: `{meta['command']}`", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slm", default="demo:slm")
    p.add_argument("--llm", default="demo:llm")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--context", type=int, default=256, help="cached tokens before each forward")
    p.add_argument("--spans", default="1,2,4,8,16", help="new tokens per forward; 1 (the decode) must be first")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", help="write OUT.json and OUT.md")
    p.add_argument("--dry", action="store_true", help="tiny random checkpoints, context 32, 2 repeats")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spans = [int(s) for s in args.spans.split(",")]
    if spans[0] != 1:
        sys.exit("error: --spans must start with 1 (the decode each extend is compared with)")
    models = {"slm": args.slm, "llm": args.llm}
    if args.dry:
        from rstitch_engine.tiny import make_tiny

        tmp = Path(tempfile.mkdtemp())
        models = {"slm": str(make_tiny(tmp / "s", "qwen2", seed=1)), "llm": str(make_tiny(tmp / "l", "qwen2",
                                                                                           hidden=128, seed=2))}
        args.context, args.repeats = 32, 2
    rows, bandwidth = [], None
    for name, source in models.items():
        model_rows, bandwidth = measure(source, name, args.dtype, args.context, spans, args.repeats)
        rows += model_rows
    meta = {**collect_meta(), "dtype": args.dtype, "threads": torch.get_num_threads(), "context": args.context,
            "repeats": args.repeats, "copy_gb_s": bandwidth / 1e9, "models": models}
    text = markdown(rows, meta)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        Path(args.out + ".md").write_text(text)


if __name__ == "__main__":
    main()
