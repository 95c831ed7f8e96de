"""The latency fit is non-negative least squares (Lawson-Hanson) on rows scaled by 1/T, checked on synthetic
timings only: a solver check against brute force, recovery of known non-negative coefficients, and a case
where unconstrained least squares really does go negative and the fit does not."""
import itertools

import numpy as np
import pytest

from rstitch_engine.router import LatencyModel, Timing
from rstitch_engine.router.latency import nnls


def brute_force_nnls(a, b):
    """The best least-squares solution over every support set whose unconstrained solve is non-negative."""
    best, best_res = np.zeros(a.shape[1]), float(np.sum(b ** 2))
    for k in range(1, a.shape[1] + 1):
        for support in itertools.combinations(range(a.shape[1]), k):
            x = np.zeros(a.shape[1])
            x[list(support)] = np.linalg.lstsq(a[:, support], b, rcond=None)[0]
            res = float(np.sum((a @ x - b) ** 2))
            if np.all(x >= 0) and res < best_res:
                best, best_res = x, res
    return best


@pytest.mark.parametrize("seed", range(20))
def test_nnls_matches_brute_force_and_kkt(seed):
    rng = np.random.default_rng(seed)
    m, n = rng.integers(3, 12), rng.integers(1, 6)
    a, b = rng.standard_normal((m, n)), rng.standard_normal(m)
    x = nnls(a, b)
    assert np.all(x >= 0)
    np.testing.assert_allclose(x, brute_force_nnls(a, b), atol=1e-9)
    w = a.T @ (b - a @ x)  # KKT: no active variable could lower the residual, the free ones are stationary
    assert np.all(w <= 1e-9) and np.allclose(w[x > 0], 0, atol=1e-9)


def test_nnls_equals_lstsq_when_that_is_non_negative():
    a = np.random.default_rng(1).uniform(0.5, 2.0, (8, 3))
    b = a @ np.array([1.0, 2.0, 0.5])
    np.testing.assert_allclose(nnls(a, b), [1.0, 2.0, 0.5], rtol=1e-10)
    assert np.all(nnls(a, -b) == 0)  # every direction raises the residual of a negative target


def _extend(a, b, c, d, n, kv):
    return a * n + b * kv + c * n * kv + d


def test_fit_recovers_non_negative_coefficients_from_noisy_timings():
    """Known coefficients, one of them zero (the fit must not push it below zero), 1% multiplicative noise."""
    rng = np.random.default_rng(7)
    true_ext, true_dec = (0.05, 0.0, 3e-5, 2.0), (0.001, 1.5)
    timings = [Timing(0, n, kv, _extend(*true_ext, n, kv) * (1 + 0.01 * rng.standard_normal()))
               for n in (2, 8, 32, 128, 512) for kv in (0, 256, 1024, 4096)]
    timings += [Timing(0, 1, kv, (true_dec[0] * kv + true_dec[1]) * (1 + 0.01 * rng.standard_normal()))
                for kv in (16, 128, 512, 1024, 2048, 4096)]
    model = LatencyModel.fit(timings, holdout=0.0)
    a, b, c, d = model.extend[0]
    assert np.all(model.extend[0] >= 0) and np.all(model.decode[0][1] >= 0)
    assert a == pytest.approx(0.05, rel=0.05) and c == pytest.approx(3e-5, rel=0.05)
    assert d == pytest.approx(2.0, rel=0.1)
    assert b < 2e-4  # the true 0, up to the noise (a cached token costs ~0.2 ms only at 4096 of them)
    assert model.decode[0][1] == pytest.approx(true_dec, rel=0.05)
    assert model.meta["fit"]["slm/extend"]["fit"]["r2"] > 0.99


def test_fit_is_exact_on_noise_free_timings():
    true_ext, true_dec = (0.09, 0.004, 8e-5, 6.0), (0.002, 4.0)
    timings = [Timing(1, n, kv, _extend(*true_ext, n, kv)) for n in (2, 8, 32, 128) for kv in (0, 512, 2048)]
    timings += [Timing(1, 1, kv, true_dec[0] * kv + true_dec[1]) for kv in (16, 512, 4096)]
    model = LatencyModel.fit(timings)
    assert model.extend[1] == pytest.approx(true_ext, rel=1e-6)
    assert model.decode[1][1] == pytest.approx(true_dec, rel=1e-6)


# Few noisy points whose timings fall as the cache grows (a warm-up artefact, say): the unconstrained
# relative-error fit gives a negative per-cached-token cost, which prices long contexts below zero.
NOISY_EXTEND = [(2, 0, 2.10), (8, 0, 2.40), (32, 0, 3.60), (2, 512, 1.90), (8, 512, 2.15), (32, 512, 3.30)]
NOISY_DECODE = [(16, 1.60), (256, 1.52), (1024, 1.35)]


def _unconstrained(x, ms):
    return np.linalg.lstsq(x / ms[:, None], np.ones_like(ms), rcond=None)[0]


def test_unconstrained_fit_goes_negative_where_the_nnls_fit_does_not():
    n, kv, ms = (np.array(col, dtype=float) for col in zip(*NOISY_EXTEND))
    x_ext = np.stack([n, kv, n * kv, np.ones_like(n)], axis=1)
    dec_kv, dec_ms = (np.array(col, dtype=float) for col in zip(*NOISY_DECODE))
    x_dec = np.stack([dec_kv, np.ones_like(dec_kv)], axis=1)
    lstsq_ext, lstsq_dec = _unconstrained(x_ext, ms), _unconstrained(x_dec, dec_ms)
    # the premise: plain lstsq really does go negative here, in coefficients and in predictions
    assert lstsq_ext.min() < 0 and lstsq_dec[0] < 0
    far = np.array([[8, 16384, 8 * 16384, 1.0]])
    assert (far @ lstsq_ext)[0] < 0 and lstsq_dec @ [16384, 1.0] < 0

    timings = [Timing(0, int(a), b, t) for a, b, t in NOISY_EXTEND] + [Timing(0, 1, b, t) for b, t in NOISY_DECODE]
    model = LatencyModel.fit(timings, holdout=0.0)
    assert np.all(model.extend[0] >= 0) and np.all(model.decode[0][1] >= 0)
    grid_n, grid_kv = np.meshgrid([1, 2, 8, 32, 512], [0, 512, 16384, 131072])
    assert np.all(model.forward_ms(0, grid_n.ravel(), grid_kv.ravel()) > 0)
    trace = [(0, 32, 0), (0, 1, 32), (0, 1, 33), (0, 8, 16384), (0, 1, 16392)]
    assert model.estimate(trace) > 0
    # ... and it is still a fit: within 15% of every timing it was given
    assert model.meta["fit"]["slm/extend"]["fit"]["max_rel_err"] < 0.15
    assert model.meta["fit"]["slm/decode/batch1"]["fit"]["max_rel_err"] < 0.15


def test_too_few_points_raise():
    extends = [Timing(0, n, kv, 1.0 + n + kv) for n, kv in ((2, 0), (8, 0), (2, 64))]
    decodes = [Timing(0, 1, 16, 1.0), Timing(0, 1, 64, 1.2)]
    with pytest.raises(ValueError, match="3 extend points cannot determine 4 coefficients"):
        LatencyModel.fit(extends + decodes)
    with pytest.raises(ValueError, match="1 decode points cannot determine 2 coefficients"):
        LatencyModel.fit(extends + [Timing(0, 8, 64, 80.0)] + decodes[:1])
    with pytest.raises(ValueError, match="timings must be positive"):
        LatencyModel.fit(extends + [Timing(0, 8, 64, 0.0)] + decodes)
