"""What one engine step costs, for the step simulator (evaluation/simulator.py; docs/method.md, 'Scheduling
the LLM under load'). Per model, a forward of R rows feeding T new tokens over C tokens of attention context
(the rows' sequence lengths summed) takes

    max(fixed + per_row*R + per_token*(T - R) + per_context*C,  floor_per_token*T)      milliseconds

(`per_row`: what each decoding row adds; `per_token`: each further token of a catch-up extend or prefill;
the floor: a compute-bound forward on a GPU), with one set of coefficients per regime of step width:
`bounds` are the token counts from which the next regime starts, where the CPU's matrix products change
algorithm (engine/ops.py, cpu_product_bounds); each step adds host time host_fixed + host_per_row*(rows of both
models). Two sources: `fit` to StepTiming rows the engine recorded on this machine (non-negative least
squares, relative error, as router/latency.py fits its per-request model), or `roofline` for a GPU that
was not measured: bytes streamed over bandwidth, FLOPs over peak.
"""
from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..protocol import Model
from ..router.latency import MODEL_NAMES, nnls, read_json, relative_nnls, write_json


@dataclass(frozen=True)
class ModelCost:
    fixed: float
    per_row: float
    per_token: float
    per_context: float
    floor_per_token: float = 0.0

    @staticmethod
    def features(rows: int, tokens: int, context: int) -> list[float]:
        return [1.0, rows, tokens - rows, context]

    def ms(self, rows: int, tokens: int, context: int) -> float:
        if rows == 0:
            return 0.0
        linear = self.fixed + self.per_row * rows + self.per_token * (tokens - rows) + self.per_context * context
        return max(linear, self.floor_per_token * tokens)


@dataclass
class StepCost:
    models: dict[int, list[ModelCost]]  # model -> one ModelCost per regime
    bounds: tuple[int, ...]             # tokens from which regime 1, 2, ... starts (regime 0 below the first)
    host_fixed: float = 0.0
    host_per_row: float = 0.0
    meta: dict = field(default_factory=dict)

    def model_ms(self, model: int, rows: int, tokens: int, context: int) -> float:
        return self.models[model][self.regime(tokens)].ms(rows, tokens, context)

    def __post_init__(self):
        self.bounds = tuple(self.bounds)
        if any(b < 2 for b in self.bounds) or list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError(f"step-cost bounds must be increasing token counts of 2 or more, got {self.bounds}")

    def regime(self, tokens: int) -> int:
        return bisect.bisect_right(self.bounds, tokens)

    def regime_name(self, regime: int) -> str:
        low = self.bounds[regime - 1] if regime else 1
        if regime == len(self.bounds):
            return f"{low}+ tokens"
        high = self.bounds[regime] - 1
        return f"{low} token{'s' * (low > 1)}" if high == low else f"{low}-{high} tokens"

    def step_ms(self, shapes) -> float:
        """Milliseconds of a step whose models ran (model, rows, tokens, context) each."""
        forwards = sum(self.model_ms(*shape) for shape in shapes)
        rows = sum(s[1] for s in shapes)
        return forwards + (self.host_fixed + self.host_per_row * rows if rows else 0.0)

    @classmethod
    def fit(cls, timings, *, bounds: tuple[int, ...], meta: dict | None = None) -> "StepCost":
        """From engine/core.py StepTiming rows (Engine.step_timings): both models, every regime."""
        timings, quality = list(timings), {}
        cost = cls({}, tuple(bounds), meta={**(meta or {}), "fit": quality})  # filled in below
        for m in sorted({t.model for t in timings}):
            cost.models[m] = []
            for regime in range(len(cost.bounds) + 1):
                mine = [t for t in timings if t.model == m and cost.regime(t.tokens) == regime]
                name = f"{MODEL_NAMES[Model(m)]}/{cost.regime_name(regime)}"
                if len(mine) < 8:
                    raise ValueError(f"step cost fit: {len(mine)} steps of {name}, need 8 or more")
                x = np.array([ModelCost.features(t.rows, t.tokens, t.context) for t in mine])
                ms = np.array([1e3 * t.seconds for t in mine])
                coef = relative_nnls(x, ms)
                cost.models[m].append(ModelCost(*map(float, coef)))
                quality[name] = {"steps": len(mine), "median_rel_err": float(np.median(np.abs(x @ coef / ms - 1)))}
        steps: dict[int, list] = {}
        for t in timings:
            steps.setdefault(t.step, []).append(t)
        host = np.array([[1.0, sum(t.rows for t in ts)] for ts in steps.values()])
        residual = np.array([1e3 * (ts[0].step_seconds - sum(t.seconds for t in ts)) for ts in steps.values()])
        cost.host_fixed, cost.host_per_row = map(float, nnls(host, np.maximum(residual, 0.0)))
        return cost

    @classmethod
    def roofline(cls, shapes: dict[int, tuple], *, bandwidth: float, peak_flops: float, host_ms: float,
                 meta: dict | None = None) -> "StepCost":
        """A GPU's step from first principles: per model (weight bytes, KV bytes per token, parameters), a
        forward streams its weights once and each row's context KV, and cannot beat parameters*2 FLOPs per
        token at `peak_flops`; `host_ms` is the step's launch and host time (CUDA graphs: tens of us)."""
        models = {}
        for m, (weight_bytes, kv_bytes_per_token, params) in shapes.items():
            cost = ModelCost(fixed=1e3 * weight_bytes / bandwidth, per_row=0.0, per_token=0.0,
                             per_context=1e3 * kv_bytes_per_token / bandwidth,
                             floor_per_token=1e3 * 2 * params / peak_flops)
            models[m] = [cost]
        return cls(models, (), host_ms, 0.0, {**(meta or {}), "bandwidth": bandwidth, "peak_flops": peak_flops})

    def to_json(self) -> dict:
        return {"units": "ms", "bounds": list(self.bounds),
                "regimes": [self.regime_name(r) for r in range(len(self.bounds) + 1)],
                "models": {MODEL_NAMES[Model(m)]: [asdict(c) for c in costs] for m, costs in sorted(self.models.items())},
                "host_fixed": self.host_fixed, "host_per_row": self.host_per_row, "meta": self.meta}

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "StepCost":
        path = Path(path)
        data = read_json(path, "step-cost file", "`python bench/hybrid_load.py calibrate`")
        names = {name: m for m, name in MODEL_NAMES.items()}
        try:
            bounds = tuple(int(b) for b in data["bounds"])
            models = {int(names[k]): [ModelCost(**c) for c in v] for k, v in data["models"].items()}
            if any(len(costs) != len(bounds) + 1 for costs in models.values()):
                raise ValueError(f"{len(bounds) + 1} regimes per model expected")
            return cls(models, bounds, float(data["host_fixed"]), float(data["host_per_row"]), data.get("meta", {}))
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"{path}: not a step-cost file ({e!r})") from None
