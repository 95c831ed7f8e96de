"""The router inside the engine's step, and the recorder training reads its decisions from.

`DeviceRouter.keeps` runs on the device for every SLM decision row of a step (engine/model_runner.py,
`ModelRunner.decide`); the runner only lets it overrule the entropy rule where the row asked for the router,
and it only changes anything where H > tau. It never syncs the host and keeps static shapes, so it can sit in
a captured step. The reference it is tested against is `Router.switch_probability` (router/model.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rstitch_engine.kernels.random import uniform_noise
from rstitch_engine.protocol import Stream

ROUTER_STREAM = int(Stream.ROUTER)  # the router's counter-based random stream (protocol.Stream lists them all)


class DeviceRouter:
    """A frozen float32 copy of a Router at a decision temperature. Temperature 0: keep the SLM token iff
    logit <= 0. Temperature T > 0: switch with probability sigmoid(logit / T), drawn from the stream-3 uniform
    of (request seed, position), so a decision is reproducible and independent of the batch."""

    def __init__(self, router, temperature: float = 0.0, recorder: "DecisionRecorder | None" = None):
        if not temperature >= 0:
            raise ValueError(f"router temperature must be >= 0, got {temperature!r}")
        weight = router.inp.weight.detach().float()
        h = router.hidden_size
        # The first layer split into its hidden-state and feature columns: no concatenation per step.
        self.w_hidden, self.w_features = weight[:, :h].clone(), weight[:, h:].clone()
        self.b_inp = router.inp.bias.detach().float().clone()
        self.w_out = router.out.weight.detach().float()[0].clone()
        self.b_out = router.out.bias.detach().float().clone()
        self.temperature, self.recorder = float(temperature), recorder
        if recorder is not None:
            recorder.temperature = self.temperature
        self._col = torch.zeros(1, dtype=torch.int64, device=weight.device)

    def logits(self, hidden: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        h = hidden.float()
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + 1e-6)
        a = F.silu(F.linear(h, self.w_hidden, self.b_inp) + F.linear(features.float(), self.w_features))
        return a @ self.w_out + self.b_out

    def keeps(self, hidden: torch.Tensor, features: torch.Tensor, seed: torch.Tensor,
              sample_pos: torch.Tensor) -> torch.Tensor:
        """bool [L]: True keeps the SLM token (if its H > tau), False hands the position to the LLM."""
        logit = self.logits(hidden, features)
        if self.temperature == 0:
            switch = logit > 0
        else:
            u = uniform_noise(seed, sample_pos, self._col, ROUTER_STREAM)[:, 0]
            switch = u < torch.sigmoid(logit / self.temperature)
        if self.recorder is not None:
            self.recorder.record(hidden, features, seed, sample_pos, logit, switch)
        return ~switch


@dataclass
class Decisions:
    """Every recorded router call of one generate(), concatenated on the CPU (row order = call order)."""
    hidden: torch.Tensor      # [N, H] in the model's dtype
    features: torch.Tensor    # [N, 4] float32
    seed: torch.Tensor        # [N] int32: the request's seed
    sample_pos: torch.Tensor  # [N] int32: position of the decided token (prompt included)
    logit: torch.Tensor       # [N] float32 log-odds of switching
    switch: torch.Tensor      # [N] bool: the action taken
    temperature: float

    def __len__(self) -> int:
        return self.seed.shape[0]


class DecisionRecorder:
    """Keeps device copies of each router call's inputs and outcome without syncing (the inputs are cloned:
    the plan buffers they view are rewritten by the next step). `decisions()` moves them to the CPU, after
    generate() has returned."""

    def __init__(self):
        self._calls: list[tuple] = []
        self.temperature: float | None = None  # set by the DeviceRouter recording into it

    def record(self, hidden, features, seed, sample_pos, logit, switch) -> None:
        self._calls.append((hidden.detach().clone(), features.clone(), seed.clone(), sample_pos.clone(), logit,
                            switch))

    def decisions(self) -> Decisions:
        if not self._calls:
            raise RuntimeError("the router recorded no decisions (did the requests use RStitchPlus?)")
        cols = [torch.cat([call[i] for call in self._calls]).cpu() for i in range(6)]
        return Decisions(*cols, temperature=self.temperature)
