"""A supervised warm start for the R-Stitch+ router, before DAPO (as R2R trains its router on labels).

An untrained router sits far from the decision boundary that matters, so a few DAPO steps leave it where it
started (its outputs equal R-Stitch's). Labels are cheap instead: run the SLM over training problems with a
router that keeps every token (the SLM's own trajectory, with every position where its entropy exceeds tau
recorded: hidden state and features, as the router sees them), then one teacher-forced LLM forward over
each trajectory says where the LLM would have chosen another token ("differs").

Which of those positions are labelled "switch" (`by`):
- "outcome" (the default): where the LLM's token differs *and* the LLM changes the problem's outcome: the
  SLM's answer is wrong and R-Stitch's (same tau, run on the same problems) is right. Where the SLM is right
  anyway, or the LLM's help does not rescue the answer, a switch buys latency and no accuracy: "keep".
  Labelling by token alone taught a router that the LLM never pays on a task where it does (docs/method.md).
- "token": wherever the LLM's token differs (R2R's labels).
A few hundred full-batch Adam steps of a class-balanced binary cross-entropy on the router's log-odds then
take seconds; DAPO continues from there (router/dapo.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..policies import RStitch, RStitchPlus
from ..protocol import LLM, SLM
from ..sampling_params import SamplingParams
from .model import Router
from .rollouts import Task, decisions_that_mattered


LABELS_BY = ("outcome", "token")


@dataclass
class Labels:
    hidden: torch.Tensor     # [N, H] the SLM's final hidden state at each position with H > tau
    features: torch.Tensor   # [N, 4] the router's features there
    switch: torch.Tensor     # [N] bool: the label (module docstring)
    differs: torch.Tensor    # [N] bool: the LLM's greedy token differs from the SLM's
    correct: torch.Tensor    # [N] bool: the SLM's trajectory answered its problem correctly
    rescued: torch.Tensor    # [N] bool: R-Stitch answered the problem correctly where the SLM did not
    problem: torch.Tensor    # [N] int64: index of the problem
    position: torch.Tensor   # [N] int64: position of the decided token in prompt + output

    def __len__(self) -> int:
        return self.switch.shape[0]

    def summary(self) -> dict:
        n = len(self)
        share = lambda flags: float(flags.float().mean()) if n else 0.0  # noqa: E731
        return {"positions": n, "switch_share": share(self.switch), "differs_share": share(self.differs),
                "correct_share": share(self.correct), "rescued_share": share(self.rescued),
                "problems": int(self.problem.unique().numel())}


def teacher_forced_logits(engine, model: int, ids: list[int], positions: list[int]) -> torch.Tensor:
    """[len(positions), vocab_limit] float32: `model`'s next-token logits after each prefix ids[:p + 1], p in
    `positions`, from one forward over `ids` (engine/worker.py Worker.teacher_forced_logits)."""
    return engine.core.executor.collective_rpc("teacher_forced_logits", model, ids, positions)[0]


def teacher_forced_argmax(engine, model: int, ids: list[int], positions: list[int]) -> list[int]:
    """The greedy next token of `model` after each prefix ids[:p + 1], p in `positions`."""
    return teacher_forced_logits(engine, model, ids, positions).argmax(-1).tolist()


def label_positions(engine, problems: list[dict], indices: list[int], *, task: Task, tau: float,
                    max_tokens: int, by: str = "outcome") -> Labels:
    """Labels of every position of the SLM's greedy trajectories over `problems[indices]` where its
    normalised entropy exceeds `tau`, "switch" where the LLM's token differs and, `by="outcome"`, R-Stitch
    rescues the problem (see the module docstring)."""
    if by not in LABELS_BY:
        raise ValueError(f"by must be one of {', '.join(LABELS_BY)}, got {by!r}")
    keep_all = Router(engine.configs[SLM].hidden_size, init_switch_prob=1e-6)  # never switches at T = 0
    seeds = list(range(len(indices)))  # decisions are joined to requests by seed
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=s) for s in seeds]
    prompts = [task.prompt(problems[i]) for i in indices]
    with keep_all.recording() as recorder:
        outs = engine.generate(prompts, params, RStitchPlus(router=keep_all, tau=tau, tau_down=tau), use_tqdm=False)
    decisions = recorder.decisions()
    correct = [bool(task.correct(problems[i], out)) for i, out in zip(indices, outs)]
    rescued = [False] * len(indices)
    if by == "outcome" and not all(correct):
        wrong = [k for k, ok in enumerate(correct) if not ok]
        stitched = engine.generate([prompts[k] for k in wrong], [params[k] for k in wrong],
                                   RStitch(tau=tau, tau_down=tau), use_tqdm=False)
        for k, out in zip(wrong, stitched):
            rescued[k] = not out.error and bool(task.correct(problems[indices[k]], out))
    rows, differs, flags, problem, where = [], [], [], [], []
    for k, (i, seed, out) in enumerate(zip(indices, seeds, outs)):
        if out.error:
            raise RuntimeError(f"labelling problem {i} failed: {out.error}")
        mattered = decisions_that_mattered(decisions, out, seed).tolist()
        if not mattered:
            continue
        ids = out.prompt_token_ids + out.token_ids
        positions = [int(decisions.sample_pos[r]) for r in mattered]  # of the decided token, prompt included
        llm = teacher_forced_argmax(engine, LLM, ids, [p - 1 for p in positions])
        rows += mattered
        differs += [a != ids[p] for a, p in zip(llm, positions)]
        flags += [(correct[k], rescued[k])] * len(mattered)
        problem += [i] * len(mattered)
        where += positions
    index = torch.tensor(rows, dtype=torch.int64)
    differs = torch.tensor(differs, dtype=torch.bool)
    flags = torch.tensor(flags, dtype=torch.bool).reshape(-1, 2)
    return Labels(hidden=decisions.hidden[index], features=decisions.features[index],
                  switch=differs & flags[:, 1] if by == "outcome" else differs, differs=differs,
                  correct=flags[:, 0], rescued=flags[:, 1], problem=torch.tensor(problem, dtype=torch.int64),
                  position=torch.tensor(where, dtype=torch.int64))


def warm_start(router: Router, labels: Labels, *, steps: int = 300, lr: float = 1e-2, seed: int = 0) -> list[dict]:
    """Fits `router` (in place) to `labels` by binary cross-entropy, full batch, the classes balanced. Returns
    the loss and accuracy per step. Deterministic for a seed."""
    if len(labels) == 0:
        raise ValueError("warm start: no labelled positions (no SLM entropy above tau on these problems)")
    device = next(router.parameters()).device
    hidden, features = labels.hidden.to(device), labels.features.to(device)
    switch = labels.switch.to(device)
    target = switch.float()
    positives, negatives = int(switch.sum()), len(labels) - int(switch.sum())
    balance = negatives / positives if positives and negatives else 1.0  # one class only: nothing to balance
    weight = torch.where(switch, balance, 1.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        optimizer = torch.optim.Adam(router.parameters(), lr=lr)
        history = []
        for step in range(steps):
            logit = router(hidden, features)
            loss = F.binary_cross_entropy_with_logits(logit, target, weight=weight / weight.mean())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append({"step": step, "loss": float(loss.detach()),
                            "accuracy": float(((logit.detach() > 0) == target.bool()).float().mean())})
    return history
