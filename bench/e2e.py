"""End-to-end benchmark of the engine (issue 5), one command, everything side by side in one run:

    python bench/e2e.py                     # H100: random bf16 weights of the 1.5B and 7B shapes
    python bench/e2e.py --shapes tiny,small --device cpu --quick   # smoke run anywhere

Measures (prompt 128, 256 new tokens unless changed): SLM-only and LLM-only decode at batch 1 with % of the
roofline (streamed weight bytes per token / measured copy bandwidth); R-Stitch with a forced 10% LLM share
in runs of 8 against LLM-only and against a cost model built from this run's own calibrated forward times;
throughput against batch size with rows switching independently (where the gain ends); context 8k;
overlap / optimistic LLM rows / parking variants; tok/s against the LLM share; speculative decoding at
forced acceptance rates against the textbook speed-up; HF transformers eager generate as the outside
baseline. Writes bench/results/e2e-<device>-<date>.json, .md and two plots.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import sys
import time
from pathlib import Path

import torch

from rstitch_engine import Engine, SamplingParams, policies
from rstitch_engine.bench import copy_bandwidth, run_bench, synthetic_prompts, time_policy
from rstitch_engine.random_models import SHAPES, streamed_bytes
from rstitch_engine.router.calibrate import Grid, calibrate

RESULTS = Path(__file__).resolve().parent / "results"


def with_roofline(row: dict, engine: Engine, bandwidth: float) -> dict:
    """Adds the batch-1 roofline of the row's token mix and the share of it reached."""
    b = {m: streamed_bytes(c, engine.dtype) for m, c in engine.configs.items()}
    per_token = row["llm_share"] * b.get(1, 0) + (1 - row["llm_share"]) * b.get(0, 0)
    roofline = bandwidth / per_token
    speed = row["decode_tok_s"] or row["tok_s"]
    return {**row, "roofline_tok_s": roofline, "pct_roofline": 100 * speed / roofline}


def build(args, **kw) -> Engine:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    slm, llm = args.shapes.split(",")
    return Engine(slm=f"random:{slm}", llm=f"random:{llm}", device=args.device, dtype=args.dtype,
                  max_model_len=args.max_model_len, max_num_seqs=max(args.batches), **kw)


def hf_baseline(args, shape: str, prompt: list[int]) -> dict:
    """transformers' eager generate on a random model of the same shape: the outside reference."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    c = SHAPES[shape]
    cfg = Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                      num_key_value_heads=c.num_kv_heads, max_position_embeddings=c.max_position_embeddings)
    with torch.device(args.device):  # initialise on the device: a 7B random init on the host takes minutes
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, args.dtype)).eval()
    ids = torch.tensor([prompt], device=args.device)
    new = min(args.max_tokens, 64)
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    if args.device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    if args.device == "cuda":
        torch.cuda.synchronize()
    del model
    return {"policy": f"hf-eager:{shape}", "batch": 1, "tok_s": new / (time.perf_counter() - t)}


def spec_expected(lat, k: int, alpha: float, n_kv: int) -> float:
    """Textbook speed-up over LLM-only: E[tokens per cycle] * t_llm_decode / (k * t_draft + t_verify)."""
    tokens = (1 - alpha ** (k + 1)) / (1 - alpha)
    cycle = k * float(lat.forward_ms(0, 1, n_kv)) + float(lat.forward_ms(1, k + 1, n_kv))
    return tokens * float(lat.forward_ms(1, 1, n_kv)) / cycle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1.5b,7b", help="SLM,LLM random shapes (rstitch_engine.random_models)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--long-context", type=int, default=8192)
    ap.add_argument("--batches", default="1,4,8,16,32,64")
    ap.add_argument("--quick", action="store_true", help="fewer sweep points (smoke runs)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.max_model_len = args.long_context + args.max_tokens + 64
    if args.quick:
        args.batches, args.long_context = [1, 4], 512
        args.max_model_len = args.long_context + args.max_tokens + 64
    dev = torch.device(args.device)
    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "shapes": args.shapes,
            "dtype": args.dtype, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "command": " ".join(sys.argv)}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    bandwidth = copy_bandwidth(dev)
    meta["copy_bandwidth_GBs"] = bandwidth / 1e9
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    forced10 = policies.Forced.periodic(0.1, 8, args.max_tokens)   # batch 1: 10% of the tokens, runs of about 8
    independent10 = policies.Forced(llm_share=0.1, mean_run=8)    # batches: one random pattern per row
    sections: dict[str, list[dict]] = {}

    engine = build(args, overlap=True)
    vocab = engine.vocab_limit
    prompt1 = synthetic_prompts(1, args.prompt_len, vocab)
    rows = run_bench(engine, prompt1, [policies.SLMOnly(), forced10], params)
    sections["batch1"] = [with_roofline(r, engine, bandwidth) for r in rows]

    # Cost model from this run's own forward times: the forced row's traces, priced by the calibration.
    chunk = engine.core.scheduler_config.max_step_tokens
    # extends over N_kv = 0 and one chunk (where the context holds it): the cached-token terms of the fit
    kv_chunks = (0, 1) if chunk + 96 < engine.max_model_len else (0,)
    lat = calibrate(engine, Grid(new_tokens=(2, 8, 32, 96), kv_chunks=kv_chunks, decode_kv=(128, 256, 384),
                                 batch_sizes=(1,), warmup=1, repeats=3 if args.quick else 5), progress=False)
    forced_row = next(r for r in rows if r["policy"] == forced10.name)
    predicted = sum(lat.estimate(t) for t in forced_row["traces"]) / 1e3
    measured = forced_row["mean_latency_s"] * forced_row["requests"]
    sections["cost_model"] = [{"policy": forced10.name, "measured_s": measured, "predicted_s": predicted,
                               "error_pct": 100 * (measured / predicted - 1), "chunk": chunk,
                               "fit": lat.meta.get("fit")}]

    shares = (0.0, 0.1, 1.0) if args.quick else (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)
    sweep = [time_policy(engine, prompt1, params, policies.Forced.periodic(s, 8, args.max_tokens)) for s in shares]
    sections["share_sweep"] = [with_roofline({**r, "llm_share_target": s}, engine, bandwidth)
                               for r, s in zip(sweep, shares)]

    spec = []
    for alpha in (0.5, 0.7, 0.9):
        r = time_policy(engine, prompt1, params, policies.SpecDecode(k=4, accept_rate=alpha))
        r["tok_s_vs_llm"] = r["tok_s"] / sections["batch1"][0]["tok_s"]
        r["expected_speedup"] = spec_expected(lat, 4, alpha, args.prompt_len + args.max_tokens // 2)
        r["error_pct"] = 100 * (r["tok_s_vs_llm"] / r["expected_speedup"] - 1)
        spec.append(r)
    sections["spec_forced_acceptance"] = spec

    batch_rows = []
    for b in args.batches:
        prompts = synthetic_prompts(b, args.prompt_len, vocab, seed=b)
        llm_row, forced_row = run_bench(engine, prompts, [independent10], params)
        batch_rows.append({"batch": b, "llm_tok_s": llm_row["tok_s"], "forced10_tok_s": forced_row["tok_s"],
                           "gain": forced_row["tok_s"] / llm_row["tok_s"], "stale_rows": forced_row["stale_rows"]})
    sections["batch_sweep"] = batch_rows

    long_prompt = synthetic_prompts(1, args.long_context, vocab, seed=9)
    sections["long_context"] = [with_roofline(r, engine, bandwidth)
                                for r in run_bench(engine, long_prompt, [policies.SLMOnly(), forced10], params)]
    del engine

    variants = []
    b32 = synthetic_prompts(max(args.batches), args.prompt_len, vocab, seed=32)
    for name, kw in [("sync", dict(overlap=False)), ("overlap, pessimistic LLM", dict(overlap=True, optimistic_llm=False)),
                     ("overlap + parking 8/4", dict(overlap=True, llm_min_batch=8, llm_max_wait=4))]:
        engine = build(args, **kw)
        for p, batch in ((forced10, prompt1), (independent10, b32)):
            r = time_policy(engine, batch, params, p)
            variants.append({"variant": name, "batch": len(batch), "tok_s": r["tok_s"],
                             "decode_tok_s": r["decode_tok_s"], "stale_rows": r["stale_rows"]})
        del engine
    sections["variants"] = variants

    sections["hf_baseline"] = [hf_baseline(args, s, prompt1[0]) for s in args.shapes.split(",")]

    for r in sum(sections.values(), []):
        r.pop("traces", None)
    write(args, meta, sections)


def write(args, meta: dict, sections: dict) -> None:
    from rstitch_engine.evaluation.report import markdown_table

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = meta["device"].replace(" ", "-").replace("/", "-")
    stem = out / f"e2e-{name}-{meta['date']}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, **sections}, indent=2, default=str) + "\n")
    md = [f"# End-to-end benchmark: {meta['shapes']} on {meta['device']}", "",
          ", ".join(f"{k}: {v}" for k, v in meta.items() if k != "command"), "", f"`{meta['command']}`", ""]
    for title, rows in sections.items():
        cols = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (list, dict))))
        md += [markdown_table(rows, cols, title=title), ""]
    stem.with_suffix(".md").write_text("\n".join(md))
    plot(sections, stem)
    print("\n".join(md))
    print(f"wrote {stem}.json, .md, -share.png, -batch.png")


def plot(sections: dict, stem: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    for suffix, rows, x, ys, xlabel in [
            ("share", sections["share_sweep"], "llm_share_target", ["tok_s"], "LLM share of tokens"),
            ("batch", sections["batch_sweep"], "batch", ["llm_tok_s", "forced10_tok_s"], "batch size")]:
        fig = Figure(figsize=(6.4, 4.0), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for y in ys:
            ax.plot([r[x] for r in rows], [r[y] for r in rows], "o-", label=y)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("tokens / s")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.savefig(f"{stem}-{suffix}.png", dpi=120)


if __name__ == "__main__":
    main()
