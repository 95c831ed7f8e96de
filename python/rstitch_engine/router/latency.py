"""The latency estimator of R-Stitch+ rewards (docs/method.md, 'R-Stitch+: latency estimator'): per model, a
linear model of one forward's time, fitted by non-negative least squares to timings profiled on the target
device (router/calibrate.py).

    extend of N_inf > 1 new tokens over N_kv cached ones:  T = a*N_inf + b*N_kv + c*N_inf*N_kv + d
    decode step (N_inf = 1) over N_kv cached tokens:       T = c'*N_kv + d'

in milliseconds. The coefficients are times, so they are fitted non-negative (an unconstrained fit on a few
noisy points can go negative and price forwards below zero). A trajectory's estimate is the sum over its
forwards (`RequestOutput.trace`, both models).
Decode coefficients are fitted per profiled batch size, but `estimate` always uses batch 1, the paper's
per-sample setting: a trajectory is priced as if it ran alone, whatever batch it was generated in, so a
reward does not depend on which other rollouts shared its steps.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..protocol import Model

MODEL_NAMES = {m: m.name.lower() for m in Model}  # the JSON keys
FORMAT = 1


@dataclass(frozen=True)
class Timing:
    """One profiled forward: `ms` milliseconds for `n_inf` new tokens per row over `n_kv` cached tokens (mean
    over the rows) with `batch` rows."""
    model: int
    n_inf: int
    n_kv: float
    ms: float
    batch: int = 1


def _design(kind: str, n_inf: np.ndarray, n_kv: np.ndarray) -> np.ndarray:
    one = np.ones_like(n_kv)
    if kind == "extend":
        return np.stack([n_inf, n_kv, n_inf * n_kv, one], axis=1)
    return np.stack([n_kv, one], axis=1)


def nnls(a: np.ndarray, b: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """argmin ||a @ x - b||_2 subject to x >= 0: the active-set algorithm NNLS of C. L. Lawson and R. J. Hanson,
    "Solving Least Squares Problems" (Prentice-Hall, 1974), chapter 23. Variables move into the passive
    (free) set one at a time, the one whose gradient most lowers the residual first; an unconstrained solve
    on the passive set that turns some of them non-positive is cut back along the segment to the largest
    feasible step, and those reaching zero go back to the active set. Ends when no active variable can
    lower the residual (the KKT conditions hold) or after `max_iter` (3n) additions; x >= 0 throughout."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    n = a.shape[1]
    tol = 10 * np.finfo(float).eps * max(a.shape) * max(np.abs(a).sum(axis=0).max(initial=0.0), 1.0)
    x, passive = np.zeros(n), np.zeros(n, dtype=bool)
    for _ in range(3 * n if max_iter is None else max_iter):
        w = a.T @ (b - a @ x)  # minus half the gradient of the squared residual
        if passive.all() or w[~passive].max() <= tol:
            break
        passive[np.argmax(np.where(passive, -np.inf, w))] = True
        while passive.any():
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if np.all(z[passive] > 0):
                x = z
                break
            cut = np.flatnonzero(passive & (z <= 0))  # x >= 0 >= z there: steps to 0 lie in [0, 1)
            steps = x[cut] / np.maximum(x[cut] - z[cut], np.finfo(float).tiny)
            x = x + steps.min() * (z - x)
            x[cut[np.argmin(steps)]] = 0.0  # exactly, whatever the rounding: each pass frees one variable
            passive &= x > tol
            x[~passive] = 0.0
    return x


def relative_nnls(x: np.ndarray, ms: np.ndarray) -> np.ndarray:
    """Non-negative coefficients of `x @ coef ~ ms`. Rows are scaled by 1/T: the fit minimises relative error,
    so a 10 ms decode counts as much as a 2 s prefill. Columns are scaled to unit norm for the solver (a
    positive scaling, so non-negativity is unchanged): N_inf*N_kv runs to millions where the constant is 1."""
    a = x / ms[:, None]
    norm = np.linalg.norm(a, axis=0)
    norm[norm == 0] = 1.0
    return nnls(a / norm, np.ones_like(ms)) / norm


def _quality(x: np.ndarray, ms: np.ndarray, coef: np.ndarray) -> dict:
    pred = x @ coef
    ss_tot = float(((ms - ms.mean()) ** 2).sum())
    return {"r2": 1.0 - float(((ms - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else None,
            "max_rel_err": float(np.max(np.abs(pred - ms) / ms))}


def _fit_group(kind: str, points: list[Timing], holdout: float, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Coefficients from all points; quality measured on a held-out share of them, fitted without it."""
    n_inf = np.array([p.n_inf for p in points], dtype=float)
    n_kv = np.array([p.n_kv for p in points], dtype=float)
    ms = np.array([p.ms for p in points], dtype=float)
    if np.any(ms <= 0):
        raise ValueError("latency fit: timings must be positive milliseconds")
    x = _design(kind, n_inf, n_kv)
    n_coef = x.shape[1]
    if len(ms) < n_coef:
        raise ValueError(f"latency fit: {len(ms)} {kind} points cannot determine {n_coef} coefficients")
    n_out = min(int(round(holdout * len(ms))), len(ms) - n_coef - 1)
    quality: dict = {"points": len(ms), "fit": _quality(x, ms, relative_nnls(x, ms))}
    if n_out >= 1:
        out = rng.permutation(len(ms))[:n_out]
        keep = np.setdiff1d(np.arange(len(ms)), out)
        quality["holdout"] = {"points": n_out, **_quality(x[out], ms[out], relative_nnls(x[keep], ms[keep]))}
    return relative_nnls(x, ms), quality


class LatencyModel:
    """Per model (0 SLM, 1 LLM): `extend[m]` = (a, b, c, d) and `decode[m][batch]` = (c', d'), in ms."""

    def __init__(self, extend: dict[int, np.ndarray], decode: dict[int, dict[int, np.ndarray]],
                 meta: dict | None = None):
        self.extend = {int(m): np.asarray(c, dtype=float) for m, c in extend.items()}
        self.decode = {int(m): {int(b): np.asarray(c, dtype=float) for b, c in by_batch.items()}
                       for m, by_batch in decode.items()}
        self.meta = dict(meta or {})
        for m in set(self.extend) | set(self.decode):
            if m not in self.extend or 1 not in self.decode.get(m, {}):
                raise ValueError(f"latency model: the {MODEL_NAMES.get(m, m)} needs extend and batch-1 decode "
                                 f"coefficients")

    # ---- fitting ---------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, samples: list[Timing], *, holdout: float = 0.2, seed: int = 0,
            meta: dict | None = None) -> "LatencyModel":
        """Non-negative least squares per model (and per batch size for decodes). `meta["fit"]` reports, per
        group, R^2 and the max relative error on the fitted points and on `holdout` of them left out of a
        second fit."""
        if not 0 <= holdout < 1:
            raise ValueError(f"holdout must be in [0, 1), got {holdout!r}")
        groups: dict[tuple, list[Timing]] = {}
        for s in samples:
            if s.n_inf < 1 or s.n_kv < 0 or s.batch < 1:
                raise ValueError(f"latency fit: bad timing {s}")
            if s.n_inf > 1 and s.batch != 1:
                raise ValueError(f"latency fit: extends are profiled one row at a time, got {s}")
            key = (s.model, "decode", s.batch) if s.n_inf == 1 else (s.model, "extend", 1)
            groups.setdefault(key, []).append(s)
        rng = np.random.default_rng(seed)
        extend, decode, quality = {}, {}, {}
        for (model, kind, batch), points in sorted(groups.items()):
            coef, q = _fit_group(kind, points, holdout, rng)
            name = MODEL_NAMES.get(model, str(model))
            if kind == "extend":
                extend[model] = coef
                quality[f"{name}/extend"] = q
            else:
                decode.setdefault(model, {})[batch] = coef
                quality[f"{name}/decode/batch{batch}"] = q
        return cls(extend, decode, {**(meta or {}), "fit": quality})

    # ---- estimating ------------------------------------------------------------------------------------
    def forward_ms(self, model: int, n_inf, n_kv, batch: int = 1):
        """Estimated time of forwards (scalars or arrays): decode coefficients where n_inf == 1."""
        if model not in self.extend:
            raise KeyError(f"the latency model has no coefficients for the {MODEL_NAMES.get(model, model)}")
        if batch not in self.decode[model]:
            raise KeyError(f"the latency model has no batch-{batch} decode coefficients for the "
                           f"{MODEL_NAMES.get(model, model)} (profiled: {sorted(self.decode[model])})")
        n_inf, n_kv = np.asarray(n_inf, dtype=float), np.asarray(n_kv, dtype=float)
        ext, dec = self.extend[model], self.decode[model][batch]
        t_extend = ext[0] * n_inf + ext[1] * n_kv + ext[2] * n_inf * n_kv + ext[3]
        return np.where(n_inf == 1, dec[0] * n_kv + dec[1], t_extend)

    def estimate(self, trace) -> float:
        """Milliseconds of a trajectory at batch 1: the sum over its (model, N_inf, N_kv) forwards."""
        rows = np.asarray(list(trace), dtype=float).reshape(-1, 3)
        total = 0.0
        for model in np.unique(rows[:, 0]).astype(int):
            mine = rows[rows[:, 0] == model]
            total += float(np.sum(self.forward_ms(int(model), mine[:, 1], mine[:, 2])))
        return total

    # ---- files -----------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        def named(coef, names):
            return dict(zip(names, map(float, coef)))

        return {
            "format": FORMAT,
            "units": "ms",
            "formulas": {"extend": "a*N_inf + b*N_kv + c*N_inf*N_kv + d", "decode": "c*N_kv + d"},
            "extend": {MODEL_NAMES[m]: named(c, "abcd") for m, c in sorted(self.extend.items())},
            "decode": {MODEL_NAMES[m]: {str(b): named(c, "cd") for b, c in sorted(by_batch.items())}
                       for m, by_batch in sorted(self.decode.items())},
            "meta": self.meta,
        }

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "LatencyModel":
        path = Path(path)
        data = read_json(path, "latency model", "`rstitch calibrate`")
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("units") != "ms":
            raise ValueError(f"{path}: not a latency model of format {FORMAT} in ms")
        index = {name: m for m, name in MODEL_NAMES.items()}
        try:
            extend = {index[n]: [c[k] for k in "abcd"] for n, c in data["extend"].items()}
            decode = {index[n]: {int(b): [c["c"], c["d"]] for b, c in by_batch.items()}
                      for n, by_batch in data["decode"].items()}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: malformed latency coefficients ({e!r})") from None
        return cls(extend, decode, data.get("meta", {}))


def write_json(path: str | Path, data: dict) -> Path:
    """A calibration file (this latency model, evaluation/step_cost.py's step costs), folders made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def read_json(path: Path, what: str, made_by: str):
    """The JSON document of a calibration file; a missing or unreadable one is an error naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no {what} at {path}; make one with {made_by}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a {what} JSON ({e.msg})") from None
