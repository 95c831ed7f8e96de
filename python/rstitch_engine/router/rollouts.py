"""Rollouts of R-Stitch+: generate with the router, score each output, and find the router decisions that
mattered in it.

A recorded decision is joined to its request by the request's seed (every rollout gets its own) and to an
output index by its position. It mattered where the scheduler says the router decided that position (the
SLM's entropy exceeded tau: its token was kept, or discarded for the LLM's); elsewhere the entropy rule
decided alone. A position decided twice (a step made stale, then re-run) counts once, with its last
decision.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..evaluation.answers import answers_equal, build_messages, extract_answer
from ..outputs import RequestOutput
from ..policies import RStitchPlus
from ..protocol import LLM
from ..sampling_params import SamplingParams
from .device import Decisions


@dataclass(frozen=True)
class Task:
    """What a rollout answers and how it is scored: `prompt(problem)` -> a prompt for Engine.generate (text or
    token ids), `correct(problem, output)` -> whether the output solves it."""
    prompt: Callable[[dict], str | list[int]]
    correct: Callable[[dict, RequestOutput], bool]


def word_problems(engine) -> Task:
    """Problems {"question", "answer"}: the chat-templated question asking for a \\boxed{} answer, correct when
    the extracted answer equals the gold one (evaluation/answers.py)."""
    if engine.tokenizer is None:
        raise ValueError("word problems need a tokenizer with a chat template; this checkpoint has none")

    def prompt(problem: dict) -> list[int]:
        text = engine.tokenizer.apply_chat_template(build_messages(problem["question"]), tokenize=False,
                                                    add_generation_prompt=True)
        return engine.tokenizer.encode(text, add_special_tokens=False)

    def correct(problem: dict, out: RequestOutput) -> bool:
        return answers_equal(extract_answer(out.text), str(problem["answer"]))

    return Task(prompt, correct)


@dataclass
class Rollout:
    problem: int             # index into the problem list
    seed: int
    output: RequestOutput
    correct: bool
    latency_ms: float        # estimated, batch 1 (router/latency.py)
    reward: float            # correct * (1 - lam * latency_ms)
    decisions: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    # ^ rows of the call's recorded Decisions that mattered, in output order (R-Stitch+ rollouts)


def decisions_that_mattered(decisions: Decisions, out: RequestOutput, seed: int) -> torch.Tensor:
    """Rows of `decisions` (int64) behind the positions of `out` the router decided (`out.routed`, reported
    by the scheduler, which owns the switching rules), in output order."""
    n_prompt = len(out.prompt_token_ids)
    last: dict[int, int] = {}
    for row in torch.nonzero(decisions.seed == seed).flatten().tolist():
        last[int(decisions.sample_pos[row]) - n_prompt] = row
    rows = []
    for i in out.routed:
        if i not in last:
            raise RuntimeError(f"no recorded router decision for output {i} of seed {seed}")
        row = last[i]
        switched = bool(decisions.switch[row])
        if i < len(out.sources) and switched != (out.sources[i] == LLM):
            raise RuntimeError(f"router decision at output {i} of seed {seed} disagrees with the output "
                               f"(switch={switched}, source={out.sources[i]})")
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64)


def score(engine, problems: list[dict], indices: list[int], seeds: list[int], policy, *, task: Task,
          max_tokens: int, latency_model, lam: float, lm_temperature: float = 0.0) -> list[Rollout]:
    """One generate() of `problems[indices[k]]` with seed `seeds[k]` under `policy`, each output scored.
    The requests skip the prefix cache: a rollout's forwards, and so its estimated latency and reward, are
    those of the request alone, not of which rollout or policy happened to run the prompt first."""
    params = [SamplingParams(max_tokens=max_tokens, temperature=lm_temperature, seed=s, skip_prefix_cache=True)
              for s in seeds]
    outs = engine.generate([task.prompt(problems[i]) for i in indices], params, policy, use_tqdm=False)
    rollouts = []
    for i, s, out in zip(indices, seeds, outs):
        if out.error:
            raise RuntimeError(f"rollout of problem {i} failed: {out.error}")
        correct = bool(task.correct(problems[i], out))
        latency = latency_model.estimate(out.trace)
        rollouts.append(Rollout(i, s, out, correct, latency, float(correct) * (1.0 - lam * latency)))
    return rollouts


def run_rollouts(engine, router, problems: list[dict], indices: list[int], seeds: list[int], *, tau: float,
                 tau_down: float | None, temperature: float, **score_kw) -> tuple[list[Rollout], Decisions]:
    """`score` under R-Stitch+ with `router` deciding at `temperature`, each rollout joined to the recorded
    decisions that mattered in it."""
    if len(set(seeds)) != len(seeds):
        raise ValueError("every rollout needs its own seed: decisions are joined to requests by seed")
    down = tau if tau_down is None else tau_down
    policy = RStitchPlus(router=router, tau=tau, tau_down=down, temperature=temperature)
    with router.recording() as recorder:
        rollouts = score(engine, problems, indices, seeds, policy, **score_kw)
    decisions = recorder.decisions()
    for r in rollouts:
        r.decisions = decisions_that_mattered(decisions, r.output, r.seed)
    return rollouts, decisions


def summarize_rollouts(rollouts: list[Rollout]) -> dict:
    """Mean reward, accuracy, token-weighted LLM share, mean estimated (ms) and measured (s) latency."""
    tokens = sum(len(r.output.token_ids) for r in rollouts)
    llm = sum(r.output.stats["llm_tokens"] for r in rollouts)
    n = max(len(rollouts), 1)
    return {"n": len(rollouts), "reward": sum(r.reward for r in rollouts) / n,
            "accuracy": sum(r.correct for r in rollouts) / n, "llm_share": llm / tokens if tokens else 0.0,
            "latency_ms": sum(r.latency_ms for r in rollouts) / n,
            "measured_s": sum(r.output.stats["latency_s"] for r in rollouts) / n, "tokens": tokens / n}


def evaluate(engine, problems: list[dict], policies: dict, *, task: Task, max_tokens: int, latency_model,
             lam: float, batch_size: int | None = None, progress: bool = True) -> list[dict]:
    """One summary row per named policy over `problems`, `batch_size` at a time (1: the measured latency is
    per sample, as the estimate is; default: all at once)."""
    from tqdm.auto import tqdm

    batch_size = batch_size or len(problems)
    if batch_size < 1 or not problems:
        raise ValueError("evaluate: needs problems and batch_size >= 1")
    rows = []
    bar = tqdm(total=len(policies) * len(problems), desc="evaluate", unit="problem", disable=not progress)
    with bar:
        for name, policy in policies.items():
            rollouts = []
            for start in range(0, len(problems), batch_size):
                indices = list(range(start, min(start + batch_size, len(problems))))
                rollouts += score(engine, problems, indices, indices, policy, task=task, max_tokens=max_tokens,
                                  latency_model=latency_model, lam=lam)
                bar.update(len(indices))
            rows.append({"policy": name, **summarize_rollouts(rollouts)})
    return rows
