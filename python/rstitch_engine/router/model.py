"""The R-Stitch+ router (docs/method.md, 'R-Stitch+: router'): a small MLP giving the log-odds of switching to
the LLM at a position where the SLM's entropy exceeds tau.

Inputs: the SLM's final-normed hidden state of the decided position, RMS-normalised again (so one learning rate
suits checkpoints whose final norms scale differently), and the four context features the scheduler writes
per row (csrc/scheduler.cpp, write_row; `FEATURES`). Layout: Linear(H + 4, width) -> SiLU -> Linear(width, 1).
Width 128 by default: about 115k parameters for the 0.5B demo SLM (H = 896), negligible next to one SLM
layer, so it costs nothing measurable inside the step, yet it can carve the hidden space finer than a linear
probe. The output layer starts at zero with bias logit(init_switch_prob): a fresh router is a constant
policy, by default "switch" (exactly R-Stitch at temperature 0), which training then refines.

Files: safetensors, with a JSON header in the metadata under "rstitch_router" (format, hidden size, width,
feature spec, and whatever the trainer adds: tau, the pair, training settings, and the dtype of the SLM whose
hidden states it learnt from, `slm_dtype`: the engine warns when it runs the router on another).
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import _C

FEATURES = ("position / 4096", "output index / max_tokens", "LLM share of the output so far",
            "min(1, output tokens since the last LLM token / 64)")
NUM_FEATURES = len(FEATURES)
HEADER_KEY = "rstitch_router"
TRAINED_DTYPE_KEY = "slm_dtype"
FORMAT = 1
assert NUM_FEATURES == _C.ROUTER_FEATURES, "the router's feature spec must match the scheduler's"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Router(nn.Module):
    def __init__(self, hidden_size: int, width: int = 128, init_switch_prob: float = 0.9, meta: dict | None = None):
        super().__init__()
        if hidden_size < 1 or width < 1:
            raise ValueError(f"hidden_size and width must be positive, got {hidden_size}, {width}")
        if not 0 < init_switch_prob < 1:
            raise ValueError(f"init_switch_prob must be in (0, 1), got {init_switch_prob!r}")
        self.hidden_size, self.width = hidden_size, width
        self.inp = nn.Linear(hidden_size + NUM_FEATURES, width)
        self.out = nn.Linear(width, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.constant_(self.out.bias, math.log(init_switch_prob / (1 - init_switch_prob)))
        self.meta = dict(meta or {})
        self.recorder = None  # a DecisionRecorder while `recording()` is open

    def forward(self, hidden: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """[L] log-odds of switching to the LLM (float32), from hidden [L, H] and features [L, 4]."""
        h = hidden.float()
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + 1e-6)
        x = torch.cat([h, features.float()], dim=-1)
        return self.out(F.silu(self.inp(x))).squeeze(-1)

    def switch_probability(self, hidden: torch.Tensor, features: torch.Tensor, temperature: float) -> torch.Tensor:
        """P(switch) of the decision rule: sigmoid(logit / T), or the hard rule logit > 0 at T = 0."""
        logit = self(hidden, features)
        return (logit > 0).float() if temperature == 0 else torch.sigmoid(logit / temperature)

    def on_device(self, temperature: float = 0.0):
        """A frozen copy for the engine's step (router/device.py), recording if `recording()` is open."""
        from .device import DeviceRouter

        return DeviceRouter(self, temperature, self.recorder)

    @contextmanager
    def recording(self):
        """Records every decision of the device copies made while open: `with router.recording() as rec:`."""
        from .device import DecisionRecorder

        self.recorder = DecisionRecorder()
        try:
            yield self.recorder
        finally:
            self.recorder = None

    @property
    def trained_dtype(self) -> str | None:
        """The SLM dtype the router was trained on ("bfloat16", "float32", ...), None if the file predates it."""
        return self.meta.get(TRAINED_DTYPE_KEY)

    def mark_trained_on(self, dtype: torch.dtype) -> None:
        self.meta[TRAINED_DTYPE_KEY] = dtype_name(dtype)

    # ---- files -----------------------------------------------------------------------------------------
    def header(self, meta: dict | None = None) -> dict:
        return {"format": FORMAT, "hidden_size": self.hidden_size, "width": self.width,
                "features": list(FEATURES), "layout": "rmsnorm(hidden) ++ features -> Linear -> SiLU -> Linear -> "
                                                      "log-odds of switching", **self.meta, **(meta or {})}

    def save(self, path: str | Path, meta: dict | None = None) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        save_file(tensors, str(path), metadata={HEADER_KEY: json.dumps(self.header(meta))})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Router":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no router file at {path}; train one with `rstitch train-router`")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {}).get(HEADER_KEY, "null"))
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as e:  # safetensors raises its own error types for a corrupt file
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ValueError(f"{path}: not an R-Stitch+ router file (no '{HEADER_KEY}' header of format {FORMAT})")
        if header.get("features") != list(FEATURES):
            raise ValueError(f"{path}: the router was trained on features {header.get('features')}, this engine "
                             f"computes {list(FEATURES)}")
        meta = {k: v for k, v in header.items() if k not in ("format", "hidden_size", "width", "features", "layout")}
        router = cls(int(header["hidden_size"]), int(header["width"]), meta=meta)
        try:
            router.load_state_dict(tensors)
        except RuntimeError as e:
            raise ValueError(f"{path}: the weights do not match the header's sizes ({e})") from None
        return router
