"""`rstitch train-router`: DAPO for the R-Stitch+ router, with both language models frozen (docs/method.md,
'R-Stitch+: DAPO training').

One step: for each of `prompts_per_batch` problems, `rollouts` rollouts with the router sampling its
decisions at `temperature`; reward r_acc * (1 - lam * L_hat_ms) with L_hat from the latency model over the
rollout's trace; advantages normalised within each problem's group; dynamic sampling (groups whose rewards are
all equal teach nothing: they are dropped and more problems are drawn, at most `max_refills` times); then
`epochs_per_batch` Adam steps on the token-level clipped objective: the mean over every router decision that
mattered (SLM entropy > tau) in the kept groups, with the asymmetric clip range [1 - clip_low, 1 + clip_high]
(clip-higher). No KL term, as in DAPO.

Determinism: problem order, rollout seeds and the router's sampled decisions (counter-based, stream 3) all
derive from `seed`, so a run resumed from a checkpoint repeats the uninterrupted run step for step.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..protocol import LLM, SLM
from .model import Router
from .rollouts import Rollout, Task, run_rollouts, summarize_rollouts, word_problems

CHECKPOINT = "checkpoint.pt"
CURVES = ("reward", "accuracy", "llm_share", "latency_ms", "groups_kept")


@dataclass(frozen=True, kw_only=True)  # 15 fields of few types: a swapped pair must not pass
class DapoConfig:
    """DAPO's settings, with the defaults that train_router and `rstitch train-router` both read; a
    checkpoint must agree on all of them to be resumed (the step count may grow)."""
    tau: float                       # entropy threshold above which the router decides
    tau_down: float | None = None    # LLM -> SLM hand-back threshold (None: tau)
    prompts_per_batch: int = 32      # problems per step
    rollouts: int = 8                # rollouts per problem: the group of the advantages
    lr: float = 3e-3                 # the router's learning rate
    lam: float = 5e-6                # latency weight per ms in the reward
    temperature: float = 1.0         # the router's sampling temperature while training
    clip_low: float = 0.2            # clip range [1 - clip_low, 1 + clip_high] (clip-higher)
    clip_high: float = 0.28
    epochs_per_batch: int = 4        # optimiser passes over each step's rollouts
    max_tokens: int = 256            # most new tokens per rollout
    max_refills: int = 2             # dynamic sampling: extra draws to refill a batch
    max_grad_norm: float = 1.0
    lm_temperature: float = 0.0      # the language models' sampling temperature in rollouts
    seed: int = 0                    # problem order, rollout seeds and sampled decisions

    def check(self) -> None:
        if self.prompts_per_batch < 1 or self.rollouts < 2:
            raise ValueError("need prompts_per_batch >= 1 and rollouts >= 2 (advantages are relative in a group)")
        if not self.temperature > 0:
            raise ValueError(f"the router must sample while training: temperature > 0, got {self.temperature!r}")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {self.clip_low}, {self.clip_high}")
        if self.lr <= 0 or self.epochs_per_batch < 1 or self.max_refills < 0 or self.lam < 0:
            raise ValueError("need lr > 0, epochs_per_batch >= 1, max_refills >= 0 and lam >= 0")


class ProblemStream:
    """Problem indices in reshuffled passes over the data set; its state goes into checkpoints."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("train_router: no problems")
        self.n, self.rng, self.queue = n, random.Random(seed), []

    def take(self, k: int) -> list[int]:
        while len(self.queue) < k:
            order = list(range(self.n))
            self.rng.shuffle(order)
            self.queue += order
        taken, self.queue = self.queue[:k], self.queue[k:]
        return taken

    def state(self) -> dict:
        return {"rng": self.rng.getstate(), "queue": list(self.queue)}

    def restore(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.queue = list(state["queue"])


@dataclass
class Batch:
    """The router decisions of the kept groups: inputs, action taken, its log-probability then, advantage."""
    hidden: torch.Tensor
    features: torch.Tensor
    switch: torch.Tensor
    old_logp: torch.Tensor
    advantage: torch.Tensor

    @staticmethod
    def join(parts: list["Batch"]) -> "Batch | None":
        parts = [p for p in parts if p.switch.numel()]
        if not parts:
            return None
        return Batch(*(torch.cat([getattr(p, f) for p in parts]) for f in
                       ("hidden", "features", "switch", "old_logp", "advantage")))


def _log_prob(logit: torch.Tensor, switch: torch.Tensor, temperature: float) -> torch.Tensor:
    z = logit / temperature
    return torch.where(switch, F.logsigmoid(z), F.logsigmoid(-z))


def group_advantages(rewards: np.ndarray) -> np.ndarray | None:
    """(r - mean) / std within a group; None when all rewards are equal (dynamic sampling drops the group)."""
    if np.ptp(rewards) <= 1e-12:
        return None
    return (rewards - rewards.mean()) / (rewards.std() + 1e-6)


def _batch(rollouts: list[Rollout], decisions, group: int, temperature: float) -> tuple[Batch, int]:
    """Training rows of the groups (consecutive runs of `group` rollouts) whose rewards differ."""
    rows, advantages, kept = [], [], 0
    for start in range(0, len(rollouts), group):
        members = rollouts[start:start + group]
        adv = group_advantages(np.array([r.reward for r in members]))
        if adv is None:
            continue
        kept += 1
        for r, a in zip(members, adv):
            rows.append(r.decisions)
            advantages.append(torch.full((len(r.decisions),), float(a)))
    index = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
    switch = decisions.switch[index]
    batch = Batch(decisions.hidden[index], decisions.features[index], switch,
                  _log_prob(decisions.logit[index], switch, temperature),
                  torch.cat(advantages) if advantages else torch.zeros(0))
    return batch, kept


def dapo_update(router: Router, optimizer, batch: Batch, cfg: DapoConfig) -> dict:
    """`epochs_per_batch` full-batch steps on the token-level clipped surrogate; returns loss and clip share."""
    device = next(router.parameters()).device
    hidden, features = batch.hidden.to(device), batch.features.to(device)
    switch, old, adv = batch.switch.to(device), batch.old_logp.to(device), batch.advantage.to(device)
    for _ in range(cfg.epochs_per_batch):
        ratio = torch.exp(_log_prob(router(hidden, features), switch, cfg.temperature) - old)
        clipped = ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)
        loss = -torch.minimum(ratio * adv, clipped * adv).mean()  # token level: every decision weighs the same
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(router.parameters(), cfg.max_grad_norm)
        optimizer.step()
    return {"loss": float(loss.detach()), "clip_frac": float(((ratio - clipped).abs() > 0).float().mean())}


class _Run:
    """One training run's mutable state: router, optimizer, problem stream, rollout counter, history."""

    def __init__(self, engine, problems, task, cfg: DapoConfig, router: Router | None, width: int,
                 init_switch_prob: float):
        self.engine, self.problems, self.task, self.cfg = engine, problems, task, cfg
        if router is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                router = Router(engine.configs[SLM].hidden_size, width, init_switch_prob)
        if router.hidden_size != engine.configs[SLM].hidden_size:
            raise ValueError(f"the router reads hidden states of size {router.hidden_size}, the SLM's are "
                             f"{engine.configs[SLM].hidden_size}")
        self.router = router.to(engine.device)
        self.optimizer = torch.optim.Adam(self.router.parameters(), lr=cfg.lr)
        self.stream = ProblemStream(len(problems), cfg.seed)
        self.seed_base = random.Random(f"rollout-seeds-{cfg.seed}").getrandbits(31)
        self.next_rollout = 0
        self.step = 0
        self.history: list[dict] = []

    def seeds(self, n: int) -> list[int]:
        first, self.next_rollout = self.next_rollout, self.next_rollout + n
        return [(self.seed_base + k) & 0x7FFFFFFF for k in range(first, first + n)]

    def collect(self, latency_model) -> tuple[Batch | None, list[Rollout], int, int]:
        """Rollouts with dynamic sampling: draws problems until prompts_per_batch groups have unequal rewards
        or the refills run out. Returns (training batch, every rollout, groups kept, groups drawn)."""
        cfg, parts, everything, kept, drawn = self.cfg, [], [], 0, 0
        for _ in range(1 + cfg.max_refills):
            need = cfg.prompts_per_batch - kept
            if need <= 0:
                break
            indices = [i for i in self.stream.take(need) for _ in range(cfg.rollouts)]
            rollouts, decisions = run_rollouts(
                self.engine, self.router, self.problems, indices, self.seeds(len(indices)), tau=cfg.tau,
                tau_down=cfg.tau_down, temperature=cfg.temperature, task=self.task, max_tokens=cfg.max_tokens,
                latency_model=latency_model, lam=cfg.lam, lm_temperature=cfg.lm_temperature)
            batch, k = _batch(rollouts, decisions, cfg.rollouts, cfg.temperature)
            parts.append(batch)
            everything += rollouts
            kept, drawn = kept + k, drawn + need
        return Batch.join(parts), everything, kept, drawn

    # ---- checkpoints -------------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        state = {"config": asdict(self.cfg), "step": self.step, "router": self.router.state_dict(),
                 "router_shape": {"hidden_size": self.router.hidden_size, "width": self.router.width},
                 "optimizer": self.optimizer.state_dict(), "stream": self.stream.state(),
                 "next_rollout": self.next_rollout, "history": self.history, "torch_rng": torch.get_rng_state()}
        tmp = directory / (CHECKPOINT + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, directory / CHECKPOINT)  # a crash mid-write leaves the previous checkpoint intact

    def restore(self, directory: Path) -> bool:
        path = directory / CHECKPOINT
        if not path.is_file():
            return False
        state = torch.load(path, map_location=self.engine.device, weights_only=False)  # our own file
        differs = {k: (v, state["config"].get(k)) for k, v in asdict(self.cfg).items() if state["config"].get(k) != v}
        if differs:
            raise ValueError(f"{path}: the checkpoint was trained with other settings (now, then): {differs}")
        if state["router_shape"] != {"hidden_size": self.router.hidden_size, "width": self.router.width}:
            raise ValueError(f"{path}: the checkpoint's router has shape {state['router_shape']}")
        self.router.load_state_dict(state["router"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.stream.restore(state["stream"])
        self.step, self.next_rollout, self.history = state["step"], state["next_rollout"], state["history"]
        torch.set_rng_state(state["torch_rng"])
        return True


def train_router(engine, problems: list[dict], *, steps: int, latency_model, task: Task | None = None,
                 router: Router | None = None, width: int = 128, init_switch_prob: float = 0.9, checkpoint_dir=None,
                 checkpoint_every: int = 10, resume: bool = False, progress: bool = True, log_path=None,
                 plot_path=None, **settings) -> tuple[Router, list[dict]]:
    """Trains an R-Stitch+ router on `engine` (both models loaded) with DAPO's `settings` (DapoConfig's fields:
    tau is required, the others have defaults) and returns (router, history), one history entry per step:
    reward and its parts (accuracy, latency_term = what the latency takes off), LLM share, estimated latency
    (ms) over every rollout of the step, the groups kept / drawn, the number of decisions trained on, loss and
    clip share. `task` defaults to word problems ({"question", "answer"}). `router` continues training a
    given router; otherwise one is made (width, init_switch_prob; seeded). With `checkpoint_dir`, a checkpoint
    every `checkpoint_every` steps and at the end; `resume=True` continues from it. `log_path`: JSONL of the
    history; `plot_path`: its curves."""
    cfg = DapoConfig(**settings)
    cfg.check()
    if steps < 0 or checkpoint_every < 1:
        raise ValueError("need steps >= 0 and checkpoint_every >= 1")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    run = _Run(engine, problems, task or word_problems(engine), cfg, router, width, init_switch_prob)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume and not run.restore(checkpoint_dir):
        raise FileNotFoundError(f"resume=True but there is no {CHECKPOINT} in {checkpoint_dir}")
    log = _open_log(log_path, run.history)
    bar = tqdm(total=steps, initial=min(run.step, steps), desc="train-router", unit="step", disable=not progress)
    try:
        while run.step < steps:
            batch, everything, kept, drawn = run.collect(latency_model)
            record = {"step": run.step + 1, **summarize_rollouts(everything), "groups_kept": kept,
                      "groups_drawn": drawn,
                      "trained_decisions": 0 if batch is None else int(batch.switch.numel())}
            # the reward's two parts: reward = accuracy - latency_term (the mean of correct * lam * L_hat)
            record["latency_term"] = record["accuracy"] - record["reward"]
            if batch is not None:
                record["switch_share"] = float(batch.switch.float().mean())
                record.update(dapo_update(run.router, run.optimizer, batch, cfg))
            run.step += 1
            run.history.append(record)
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if checkpoint_dir is not None and (run.step % checkpoint_every == 0 or run.step == steps):
                run.save(checkpoint_dir)
            bar.update(1)
            bar.set_postfix(reward=f"{record['reward']:.3f}", acc=f"{record['accuracy']:.2f}",
                            llm=f"{record['llm_share']:.2f}", kept=kept)
    finally:
        bar.close()
        if log is not None:
            log.close()
    run.router.mark_trained_on(engine.dtype)
    run.router.meta.update(tau=cfg.tau, tau_down=cfg.tau_down if cfg.tau_down is not None else cfg.tau,
                           slm=str(engine.paths[SLM]), llm=str(engine.paths[LLM]),
                           training={**asdict(cfg), "steps": run.step, "algorithm": "DAPO"})
    if plot_path is not None and run.history:
        plot_curves(run.history, plot_path)
    return run.router, run.history


def _open_log(path, history: list[dict]):
    """The JSONL log, rewritten from the (possibly restored) history so it never runs ahead of a checkpoint."""
    if path is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = path.open("w", encoding="utf-8")
    for record in history:
        f.write(json.dumps(record) + "\n")
    return f


def plot_curves(history: list[dict], path) -> Path:
    """One panel per training curve (reward, accuracy, LLM share, estimated latency, groups kept) over steps."""
    try:  # imported here so training works without matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plot_curves needs matplotlib: pip install 'rstitch-engine[plot]'") from e
    fig = Figure(figsize=(3.2 * len(CURVES), 3.0), layout="constrained")
    FigureCanvasAgg(fig)
    steps = [h["step"] for h in history]
    for i, name in enumerate(CURVES):
        ax = fig.add_subplot(1, len(CURVES), i + 1)
        ax.plot(steps, [h[name] for h in history], "o-", markersize=3)
        ax.set_title(name.replace("_", " "))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
