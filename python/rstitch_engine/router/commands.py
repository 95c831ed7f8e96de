"""`rstitch calibrate` and `rstitch train-router`: the command functions and their sub-parsers
(`add_commands(subparsers)` registers both)."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

from ..cli_args import chosen_problems, engine_args, make_engine, problem_args
from ..protocol import LLM, SLM


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


# ---- calibrate ---------------------------------------------------------------------------------------------

def cmd_calibrate(args) -> None:
    import torch

    from .calibrate import calibrate, default_grid

    if not (args.slm or args.llm):
        sys.exit("error: give --slm and/or --llm")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    grid, chunk = default_grid(device)
    chunk = args.chunk or chunk
    overrides = {k: v for k, v in (("new_tokens", args.new_tokens), ("kv_chunks", args.kv_chunks),
                                   ("decode_kv", args.decode_kv), ("batch_sizes", args.batch_sizes),
                                   ("warmup", args.warmup), ("repeats", args.repeats)) if v is not None}
    grid = dataclasses.replace(grid, **overrides)
    grid.check(chunk)
    engine = make_engine(args, device=device, max_num_batched_tokens=chunk, max_num_seqs=max(grid.batch_sizes),
                         max_model_len=args.max_model_len or grid.max_context(chunk))
    model = calibrate(engine, grid, holdout=args.holdout, seed=args.seed, progress=not args.no_progress)
    model.save(args.out)
    for group, q in model.meta["fit"].items():
        held = q.get("holdout")
        held_text = f"held-out R^2 {held['r2']:.4f}, max rel err {held['max_rel_err']:.1%} ({held['points']} pts)" \
            if held and held["r2"] is not None else "no held-out points"
        print(f"{group:22s} fit R^2 {q['fit']['r2']:.4f}, max rel err {q['fit']['max_rel_err']:.1%}; {held_text}")
    print(f"wrote {args.out}")


def _calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="profile both models' forwards and fit the R-Stitch+ latency model",
                       description="Times extends over a grid of (new tokens, cached tokens) and decode steps over "
                                   "cached tokens and batch sizes, per model, through the engine's own step path "
                                   "on this device; fits T = a*N_inf + b*N_kv + c*N_inf*N_kv + d (extend) and "
                                   "T = c'*N_kv + d' (decode) in ms and writes them as JSON with the device and "
                                   "versions. Grids default small on the CPU. --max-model-len defaults to what the "
                                   "grid needs; on the CPU give the one of the runs to estimate, as attention "
                                   "costs grow with it there.")
    p.add_argument("--out", required=True, help="latency model JSON to write")
    p.add_argument("--chunk", type=int, help="step token budget: extends run over multiples of it (default: 128 "
                                             "on the CPU, 512 on CUDA)")
    p.add_argument("--new-tokens", type=_ints, metavar="N,N,...",
                   help="extend sizes N_inf, each <= chunk (default: 2,16,64,128 on the CPU, 2,8,32,128,512 on CUDA)")
    p.add_argument("--kv-chunks", type=_ints, metavar="K,K,...",
                   help="extend contexts as multiples of the chunk (default: 0,1,2 on the CPU, 0,1,2,4,8 on CUDA)")
    p.add_argument("--decode-kv", type=_ints, metavar="N,N,...",
                   help="decode contexts (default: 32,128,256 on the CPU, 64,512,1024,2048,4096,8192 on CUDA)")
    p.add_argument("--batch-sizes", type=_ints, metavar="B,B,...",
                   help="decode batch sizes, must include 1 (default: 1,4 on the CPU, 1,8,32 on CUDA)")
    p.add_argument("--warmup", type=int, help="untimed runs per grid point (default: 1 on the CPU, 2 on CUDA)")
    p.add_argument("--repeats", type=int, help="timed runs per grid point (default: 3 on the CPU, 5 on CUDA)")
    p.add_argument("--holdout", type=float, default=0.2, help="share of grid points held out to report the fit")
    p.add_argument("--seed", type=int, default=0, help="seed of the hold-out split and the profiled tokens")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    engine_args(p, skip=("max_num_batched_tokens", "max_num_seqs"))  # --chunk and the grid's batch sizes set them
    p.set_defaults(func=cmd_calibrate)


# ---- train-router ------------------------------------------------------------------------------------------

def cmd_train_router(args) -> None:
    import torch

    from ..evaluation import synthetic_problems
    from ..evaluation.report import markdown_table, write_results
    from ..policies import RStitch, RStitchPlus
    from .dapo import train_router
    from .latency import LatencyModel
    from .model import Router
    from .rollouts import evaluate, word_problems

    problems, _ = chosen_problems(args)
    latency = LatencyModel.load(args.latency)
    engine = make_engine(args, slm=args.slm or "demo:slm", llm=args.llm or "demo:llm",
                         max_num_seqs=args.prompts_per_batch * args.rollouts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    initial_path = out / "router-init.safetensors"
    if args.resume and initial_path.is_file():
        initial = Router.load(initial_path)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            initial = Router(engine.configs[0].hidden_size, args.width, args.init_switch_prob)
        note = "untrained"
        if args.warm_start:
            from .warm_start import label_positions, warm_start

            labels = label_positions(engine, problems, list(range(min(args.warm_start, len(problems)))),
                                     task=word_problems(engine), tau=args.tau, max_tokens=args.max_tokens,
                                     by=args.warm_start_labels)
            curve = warm_start(initial, labels, steps=args.warm_start_steps, lr=args.warm_start_lr, seed=args.seed)
            (out / "warm_start.json").write_text(json.dumps({"labels": labels.summary(), "curve": curve}))
            note = f"warm start on {args.warm_start} problems, labels by {args.warm_start_labels}: {labels.summary()}"
            print(f"warm start: {labels.summary()}, accuracy {curve[-1]['accuracy']:.3f}")
        initial.mark_trained_on(engine.dtype)
        initial.save(initial_path, meta={"tau": args.tau, "note": note})
    settings = {name: getattr(args, name) for name, _, _ in DAPO_OPTIONS}
    router, history = train_router(
        engine, problems, steps=args.steps, latency_model=latency, router=copy.deepcopy(initial),
        checkpoint_dir=out / "checkpoints", checkpoint_every=args.checkpoint_every, resume=args.resume,
        progress=not args.no_progress, log_path=out / "log.jsonl", plot_path=out / "curves.png", **settings)
    router.save(out / "router.safetensors")
    print(f"wrote {out}/: router.safetensors, log.jsonl, curves.png, checkpoints/")
    if not args.eval:
        return
    held_out = synthetic_problems(args.eval, args.eval_seed, args.level)
    rstitch = f"rstitch:{args.tau:g}"
    # A fresh router is constant (zero output layer); one that switches is R-Stitch exactly at temperature 0
    # (tests/test_router.py), so its row would repeat R-Stitch's: it is named there instead of run twice.
    untrained_is_rstitch = not initial.out.weight.any() and float(initial.out.bias.detach()) > 0
    policies = {rstitch + (" = rstitch+ untrained" if untrained_is_rstitch else ""):
                RStitch(tau=args.tau, tau_down=args.tau_down)}
    if not untrained_is_rstitch:
        name = "rstitch+ warm start" if args.warm_start else "rstitch+ untrained"
        policies[name] = RStitchPlus(router=initial, tau=args.tau, tau_down=args.tau_down)
    policies["rstitch+ trained"] = RStitchPlus(router=router, tau=args.tau, tau_down=args.tau_down)
    rows = evaluate(engine, held_out, policies, task=word_problems(engine), max_tokens=args.max_tokens,
                    latency_model=latency, lam=args.lam, batch_size=args.eval_batch_size,
                    progress=not args.no_progress)
    meta = {"slm": str(engine.paths[SLM]), "llm": str(engine.paths[LLM]), "latency_model": str(args.latency),
            "latency_device": latency.meta.get("device"), "eval": f"synthetic:{args.eval}:seed{args.eval_seed}:{args.level}",
            "eval_batch_size": args.eval_batch_size, "training": router.meta.get("training"),
            "final_step": history[-1] if history else None}
    write_results(out, "eval", rows, meta)
    print(markdown_table(rows, list(rows[0])))
    print(json.dumps({"wrote": [str(out / "eval.json"), str(out / "eval.md")]}))


# the DapoConfig fields `rstitch train-router` offers, with their type and help (defaults: DapoConfig's)
DAPO_OPTIONS = (
    ("tau", float, "entropy threshold above which the router decides"),
    ("tau_down", float, "LLM -> SLM hand-back threshold (default: tau)"),
    ("prompts_per_batch", int, "problems per step"),
    ("rollouts", int, "rollouts per problem (the group of the advantages)"),
    ("lr", float, "learning rate of the router"),
    ("lam", float, "latency weight per ms in the reward"),
    ("temperature", float, "router sampling temperature while training"),
    ("epochs_per_batch", int, "optimiser passes over each step's rollouts"),
    ("max_refills", int, "dynamic sampling: extra draws to refill a batch"),
    ("max_tokens", int, "most new tokens per rollout"),
    ("seed", int, "seed of the router's initial weights and of training"))


def _train_router_parser(sub) -> None:
    from .dapo import DapoConfig
    from .warm_start import LABELS_BY

    p = sub.add_parser("train-router", help="train the R-Stitch+ router with DAPO (both LMs frozen)",
                       description="DAPO: per step, --prompts-per-batch problems with --rollouts rollouts each, the "
                                   "router sampling its decisions; reward correct * (1 - lam * estimated latency "
                                   "in ms); group-normalised advantages, clip-higher, dynamic sampling, "
                                   "token-level loss over the decisions where the SLM's entropy exceeds tau. "
                                   "Writes the router, a JSONL log, the curves and resumable checkpoints to --out; "
                                   "--eval N then compares R-Stitch, the untrained and the trained router on N "
                                   "held-out synthetic problems. Models default to the demo pair.")
    p.add_argument("--latency", required=True, help="latency model JSON from `rstitch calibrate`")
    p.add_argument("--steps", type=int, default=100, help="training steps (one batch of problems each)")
    defaults = {f.name: f.default for f in dataclasses.fields(DapoConfig)}  # one home: DapoConfig
    for name, kind, text in DAPO_OPTIONS:
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, required=name == "tau",
                       default=None if name == "tau" else defaults[name], help=text)
    p.add_argument("--width", type=int, default=128, help="router hidden width")
    p.add_argument("--init-switch-prob", type=float, default=0.9, help="the untrained router's P(switch)")
    p.add_argument("--warm-start", type=int, default=0, metavar="N",
                   help="before DAPO, fit the router to labels from the first N training problems: where the "
                        "SLM's entropy exceeds tau, would the LLM have chosen another token (router/warm_start.py)")
    p.add_argument("--warm-start-labels", choices=LABELS_BY, default=LABELS_BY[0],
                   help="label 'switch' where the LLM's token differs and R-Stitch rescues a problem the SLM gets "
                        "wrong (outcome), or wherever the LLM's token differs (token)")
    p.add_argument("--warm-start-steps", type=int, default=300, help="full-batch steps of the warm start")
    p.add_argument("--warm-start-lr", type=float, default=1e-2, help="learning rate of the warm start")
    problem_args(p)
    p.add_argument("--eval", type=int, metavar="N", help="afterwards, evaluate on N held-out synthetic problems "
                                                          "(of --level)")
    p.add_argument("--eval-seed", type=int, default=1000, help="seed of the held-out problems")
    p.add_argument("--eval-batch-size", type=int, default=1, help="1: measured latency per sample")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--checkpoint-every", type=int, default=10, help="steps between resumable checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    engine_args(p, demo_pair=True, skip=("max_num_seqs",))  # prompts per batch x rollouts
    p.set_defaults(func=cmd_train_router)


def add_commands(subparsers) -> None:
    """Registers `calibrate` and `train-router` on the `rstitch` command's sub-parsers."""
    _calibrate_parser(subparsers)
    _train_router_parser(subparsers)
