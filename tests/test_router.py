"""R-Stitch+: latency estimator and calibration, the router's device path against its reference, the policy's
identities with R-Stitch in the engine, DAPO raising reward on a task where routing matters, and resuming."""
import json
import math
import random
import shutil
import warnings

import numpy as np
import pytest
import torch

from rstitch_engine import Engine, SamplingParams, policies
from rstitch_engine.kernels.random import uniform_noise
from rstitch_engine.router import (FEATURES, Grid, LatencyModel, Router, Task, Timing, calibrate, default_grid,
                                   profile, run_rollouts, summarize_rollouts, train_router)
from rstitch_engine.router.device import ROUTER_STREAM
from rstitch_engine.router.rollouts import decisions_that_mattered

PROMPTS = [[5, 17, 200], list(range(40, 61)), [9] * 7 + [250, 3], [100], list(range(300, 340, 3))]
GREEDY = SamplingParams(max_tokens=20, temperature=0.0)
TAU = 0.75  # SLM entropies of the tiny pair: 0.69-0.81 (10-90%)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and much faster on a machine other jobs keep busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine(pair):
    slm, llm = pair
    return Engine(slm=slm, llm=llm, device="cpu", dtype="float32", block_size=4, kv_cache_gb=0.02)


def constant_router(hidden_size: int, switch: bool) -> Router:
    return Router(hidden_size, init_switch_prob=1 - 1e-6 if switch else 1e-6)


def random_router(hidden_size: int, seed: int = 0) -> Router:
    torch.manual_seed(seed)
    router = Router(hidden_size, width=16)
    torch.nn.init.normal_(router.out.weight, std=0.5)
    torch.nn.init.zeros_(router.out.bias)
    return router


# ---- latency estimator ---------------------------------------------------------------------------------------

TRUE = {"extend": {0: (0.02, 0.001, 2e-5, 1.5), 1: (0.09, 0.004, 8e-5, 6.0)},
        "decode": {0: (0.0005, 1.2), 1: (0.002, 4.0)}}


def synthetic_timings(noise: float, seed: int = 0) -> list[Timing]:
    rng = np.random.default_rng(seed)
    out = []
    for m in (0, 1):
        a, b, c, d = TRUE["extend"][m]
        for n in (2, 8, 32, 128, 512):
            for kv in (0, 256, 1024, 4096):
                out.append(Timing(m, n, kv, (a * n + b * kv + c * n * kv + d) * (1 + noise * rng.standard_normal())))
        c1, d1 = TRUE["decode"][m]
        for kv in (16, 128, 512, 1024, 2048, 4096, 8192):
            out.append(Timing(m, 1, kv, (c1 * kv + d1) * (1 + noise * rng.standard_normal())))
            out.append(Timing(m, 1, kv, 2 * (c1 * kv + d1), batch=8))
    return out


def test_fit_recovers_known_coefficients():
    model = LatencyModel.fit(synthetic_timings(noise=0.02), holdout=0.2)
    for m in (0, 1):
        a, b, c, d = model.extend[m]
        ta, tb, tc, td = TRUE["extend"][m]
        assert a == pytest.approx(ta, rel=0.05) and c == pytest.approx(tc, rel=0.05)
        assert d == pytest.approx(td, rel=0.1) and b == pytest.approx(tb, rel=0.2)
        assert model.decode[m][1] == pytest.approx(TRUE["decode"][m], rel=0.05)
        assert model.decode[m][8] == pytest.approx(2 * np.array(TRUE["decode"][m]), rel=1e-6)
    fit = model.meta["fit"]
    assert set(fit) == {"slm/extend", "llm/extend", "slm/decode/batch1", "llm/decode/batch1",
                        "slm/decode/batch8", "llm/decode/batch8"}
    for group in ("slm/extend", "llm/extend"):
        assert fit[group]["fit"]["r2"] > 0.99
        assert fit[group]["holdout"]["points"] == 4 and fit[group]["holdout"]["r2"] > 0.99
        assert fit[group]["holdout"]["max_rel_err"] < 0.1
    exact = LatencyModel.fit(synthetic_timings(noise=0.0))
    assert exact.extend[1] == pytest.approx(TRUE["extend"][1], rel=1e-6)


def test_estimate_sums_a_trace_by_hand():
    model = LatencyModel({0: [0.1, 0.01, 0.001, 2.0], 1: [1.0, 0.1, 0.01, 20.0]},
                         {0: {1: [0.002, 1.0]}, 1: {1: [0.02, 10.0]}})
    trace = [(0, 12, 0), (0, 1, 12), (0, 1, 13), (1, 15, 0), (1, 1, 15), (0, 3, 14)]
    by_hand = ((0.1 * 12 + 2.0) + (0.002 * 12 + 1.0) + (0.002 * 13 + 1.0) + (1.0 * 15 + 20.0)
               + (0.02 * 15 + 10.0) + (0.1 * 3 + 0.01 * 14 + 0.001 * 3 * 14 + 2.0))
    assert model.estimate(trace) == pytest.approx(by_hand, rel=1e-12)
    assert model.estimate([]) == 0.0
    with pytest.raises(KeyError, match="batch-4"):
        model.forward_ms(0, 1, 10, batch=4)


def test_latency_model_file_round_trip(tmp_path):
    model = LatencyModel.fit(synthetic_timings(noise=0.01), meta={"device": "test-device", "torch": "x"})
    path = model.save(tmp_path / "lat.json")
    data = json.loads(path.read_text())
    assert data["units"] == "ms" and set(data["extend"]) == {"slm", "llm"} and data["meta"]["device"] == "test-device"
    again = LatencyModel.load(path)
    trace = [(0, 40, 0), (0, 1, 40), (1, 41, 0), (1, 1, 41), (0, 2, 41)]
    assert again.estimate(trace) == pytest.approx(model.estimate(trace), rel=1e-12)
    assert again.decode[1].keys() == {1, 8}
    (tmp_path / "bad.json").write_text('{"format": 1}')
    with pytest.raises(ValueError, match="not a latency model"):
        LatencyModel.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="rstitch calibrate"):
        LatencyModel.load(tmp_path / "missing.json")


def test_calibrate_tiny_pair_end_to_end(pair, tmp_path):
    slm, llm = pair
    chunk = 16
    grid = Grid(new_tokens=(2, 8, 16), kv_chunks=(0, 1, 2), decode_kv=(4, 20, 40), batch_sizes=(1, 2),
                warmup=1, repeats=2)
    engine = Engine(slm=slm, llm=llm, device="cpu", dtype="float32", block_size=4, kv_cache_gb=0.02,
                    max_num_batched_tokens=chunk, max_num_seqs=2, max_model_len=grid.max_context(chunk))
    model = calibrate(engine, grid, progress=False)
    timings = [Timing(**t) for t in model.meta["timings"]]
    extends = {(t.model, t.n_inf, t.n_kv) for t in timings if t.n_inf > 1}
    assert extends == {(m, n, k * chunk) for m in (0, 1) for n in (2, 8, 16) for k in (0, 1, 2)}
    decodes = [t for t in timings if t.n_inf == 1]
    assert {(t.model, t.batch) for t in decodes} == {(m, b) for m in (0, 1) for b in (1, 2)}
    assert all(kv <= t.n_kv <= kv + 8 for t, kv in zip(sorted(decodes, key=lambda t: (t.model, t.batch, t.n_kv)),
                                                         [4, 20, 40] * 4))
    path = model.save(tmp_path / "latency.json")
    loaded = LatencyModel.load(path)
    assert loaded.meta["device"] and loaded.meta["torch"] == torch.__version__ and loaded.meta["chunk"] == chunk
    assert len(loaded.meta["timings"]) == len(timings)
    out = engine.generate([PROMPTS[1]], GREEDY, policies.RStitch(tau=TAU), use_tqdm=False)[0]
    estimate = loaded.estimate(out.trace)  # from a fit to wall-clock timings: a number, >= 0 by construction
    assert math.isfinite(estimate) and estimate >= 0
    with pytest.raises(ValueError, match="extend sizes"):
        profile(engine, Grid(new_tokens=(1, 8)), progress=False)
    for device in ("cpu", "cuda"):
        default, default_chunk = default_grid(device)
        default.check(default_chunk)


# ---- the router: device path, files, engine checks -------------------------------------------------------

def test_device_path_equals_reference():
    router = random_router(32)
    g = torch.Generator().manual_seed(1)
    hidden, features = torch.randn(300, 32, generator=g) * 3, torch.rand(300, 4, generator=g)
    seed = torch.randint(0, 2**31 - 1, (300,), dtype=torch.int32, generator=g)
    pos = torch.randint(0, 5000, (300,), dtype=torch.int32, generator=g)
    with torch.no_grad():
        logit = router(hidden, features)
    assert (logit > 0).any() and (logit <= 0).any(), "the test needs both decisions"
    away_from_tie = logit.abs() > 1e-4
    greedy = router.on_device(0.0)
    assert torch.allclose(greedy.logits(hidden, features), logit, atol=1e-5)
    keep = greedy.keeps(hidden, features, seed, pos)
    assert keep.dtype == torch.bool and keep.shape == (300,)
    assert torch.equal(keep[away_from_tie], (logit <= 0)[away_from_tie])

    with router.recording() as rec:
        sampled = router.on_device(0.7)
        keep = sampled.keeps(hidden, features, seed, pos)
    d = rec.decisions()
    with torch.no_grad():
        prob = router.switch_probability(hidden, features, 0.7)
    assert d.temperature == 0.7 and torch.allclose(torch.sigmoid(d.logit / d.temperature), prob, atol=1e-6)
    u = uniform_noise(seed, pos, torch.zeros(1, dtype=torch.int64), ROUTER_STREAM)[:, 0]
    clear = (u - prob).abs() > 1e-5
    assert torch.equal(~keep[clear], (u < prob)[clear]) and torch.equal(d.switch, ~keep)
    assert torch.equal(d.hidden, hidden) and torch.equal(d.seed, seed) and torch.equal(d.sample_pos, pos)
    # reproducible and independent of the batch a row sits in
    for i in (0, 7, 299):
        alone = sampled.keeps(hidden[i:i + 1], features[i:i + 1], seed[i:i + 1], pos[i:i + 1])
        assert bool(alone[0]) == bool(keep[i])
    # low-precision hidden states go through the same float32 computation
    h16 = hidden.bfloat16()
    with torch.no_grad():
        assert torch.allclose(greedy.logits(h16, features), router(h16, features), atol=1e-5)


@pytest.mark.cuda
def test_device_path_does_not_sync_the_host():
    router = random_router(32).to("cuda")
    args = (torch.randn(8, 32, device="cuda"), torch.rand(8, 4, device="cuda"),
            torch.arange(8, dtype=torch.int32, device="cuda"), torch.arange(8, dtype=torch.int32, device="cuda"))
    for temperature in (0.0, 1.0):
        device_router = router.on_device(temperature)
        device_router.keeps(*args)  # first call: lazy initialisations may sync
        torch.cuda.set_sync_debug_mode("error")
        try:
            device_router.keeps(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_router_file_round_trip(tmp_path):
    router = random_router(32)
    router.meta = {"slm": "small"}
    path = router.save(tmp_path / "r.safetensors", meta={"tau": 0.05, "training": {"steps": 3}})
    loaded = Router.load(path)
    assert loaded.hidden_size == 32 and loaded.width == 16
    assert loaded.meta == {"slm": "small", "tau": 0.05, "training": {"steps": 3}}
    for (name, a), (_, b) in zip(router.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["rstitch_router"])
    assert header["features"] == list(FEATURES) and header["format"] == 1
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not an R-Stitch\\+ router file"):
        Router.load(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError):
        Router.load(tmp_path / "missing.safetensors")


def test_engine_refuses_a_router_of_the_wrong_hidden_size(engine, tmp_path):
    path = Router(17).save(tmp_path / "r.safetensors")
    for router in (path, Router(17)):
        with pytest.raises(ValueError, match="hidden states of size 17, the SLM's are 32"):
            engine.generate(PROMPTS[:1], GREEDY, policies.RStitchPlus(router=router, tau=TAU), use_tqdm=False)


def test_engine_warns_when_the_router_was_trained_in_another_dtype(engine, tmp_path):
    """A router records the SLM dtype it was trained on; running it on another dtype warns, naming both."""
    other, same, unknown = (constant_router(32, True) for _ in range(3))
    other.mark_trained_on(torch.bfloat16)
    same.mark_trained_on(torch.float32)  # the engine fixture's dtype
    assert Router.load(other.save(tmp_path / "r.safetensors")).trained_dtype == "bfloat16"
    with pytest.warns(UserWarning, match="trained on the SLM in bfloat16; this engine runs it in float32"):
        engine.generate(PROMPTS[:1], GREEDY, policies.RStitchPlus(router=tmp_path / "r.safetensors", tau=TAU),
                        use_tqdm=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for router in (same, unknown):  # a file from before the field: nothing to compare
            engine.generate(PROMPTS[:1], GREEDY, policies.RStitchPlus(router=router, tau=TAU), use_tqdm=False)


# ---- R-Stitch+ in the engine ------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("overlap", [False, True])
def test_constant_routers_give_rstitch_identities(pair, temperature, overlap):
    slm, llm = pair
    eng = Engine(slm=slm, llm=llm, device="cpu", dtype="float32", block_size=4, kv_cache_gb=0.02, overlap=overlap)
    switch = eng.generate(PROMPTS, GREEDY, policies.RStitchPlus(router=constant_router(32, True), tau=TAU,
                                                                temperature=temperature), use_tqdm=False)
    rstitch = eng.generate(PROMPTS, GREEDY, policies.RStitch(tau=TAU), use_tqdm=False)
    assert [(o.token_ids, o.sources) for o in switch] == [(o.token_ids, o.sources) for o in rstitch]
    assert {s for o in rstitch for s in o.sources} == {0, 1}
    # Keeping everywhere never hands a position to the LLM: R-Stitch with tau_up = +inf, i.e. the SLM alone.
    keep = eng.generate(PROMPTS, GREEDY, policies.RStitchPlus(router=constant_router(32, False), tau=TAU,
                                                              temperature=temperature), use_tqdm=False)
    never = eng.generate(PROMPTS, GREEDY, policies.RStitch(tau=math.inf, tau_down=TAU), use_tqdm=False)
    slm_only = eng.generate(PROMPTS, GREEDY, policies.SLMOnly(), use_tqdm=False)
    assert [(o.token_ids, o.sources) for o in keep] == [(o.token_ids, o.sources) for o in never]
    assert [o.token_ids for o in keep] == [o.token_ids for o in slm_only]


def test_decisions_that_mattered_are_the_ones_above_tau(engine):
    seeds = list(range(100, 100 + len(PROMPTS)))
    params = [SamplingParams(max_tokens=20, temperature=0.0, seed=s) for s in seeds]
    for router in (constant_router(32, True), constant_router(32, False), random_router(32)):
        with router.recording() as rec:
            outs = engine.generate(PROMPTS, params, policies.RStitchPlus(router=router, tau=TAU, temperature=1.0),
                                   use_tqdm=False)
        d = rec.decisions()
        for out, seed in zip(outs, seeds):
            rows = decisions_that_mattered(d, out, seed)
            switched = d.switch[rows]
            # every switch the router made is one to the LLM; every kept decision is an SLM token with H > TAU
            assert int(switched.sum()) == out.stats["switches_to_llm"]
            kept_above = sum(1 for s, h in zip(out.sources, out.entropies) if s == 0 and np.float32(h) > TAU)
            assert int((~switched).sum()) == kept_above
            positions = d.sample_pos[rows] - len(out.prompt_token_ids)
            assert torch.all(positions[1:] > positions[:-1])


# ---- DAPO ---------------------------------------------------------------------------------------------------

BUMP_TOKEN, HORIZON, LAM = 100, 12, 3e-3
# A made-up device where the LLM costs ten times the SLM: always switching is far from free.
TOY_LATENCY = LatencyModel(extend={0: [0.1, 0, 0, 1], 1: [1, 0, 0, 10]}, decode={0: {1: [0, 1]}, 1: {1: [0, 10]}})


@pytest.fixture(scope="module")
def bump_pair(tiny, tmp_path_factory):
    """(slm, llm): the LLM is the SLM with one extra direction in its output row of token 100, so it differs
    from the SLM exactly in a half-space of the SLM's (shared) final hidden state. A router can learn that
    region; switching anywhere else costs latency for nothing."""
    from safetensors.torch import load_file, save_file

    slm = tiny("qwen2", seed=1, init_std=0.3, hidden=32, heads=4, kv_heads=2, layers=2)
    llm = tmp_path_factory.mktemp("bump-llm")
    for f in slm.iterdir():
        shutil.copy(f, llm / f.name)
    weights = load_file(slm / "model.safetensors")
    v = torch.randn(weights["lm_head.weight"].shape[1], generator=torch.Generator().manual_seed(3))
    weights["lm_head.weight"][BUMP_TOKEN] += 8.0 * v / v.norm()
    save_file(weights, llm / "model.safetensors")
    return slm, llm


@pytest.fixture(scope="module")
def bump_task(bump_pair):
    """Engine, training and held-out problems: correct iff the output equals the LLM's greedy output."""
    eng = Engine(slm=bump_pair[0], llm=bump_pair[1], device="cpu", dtype="float32", block_size=4,
                 kv_cache_gb=0.05, max_num_seqs=256)
    rng = random.Random(0)
    problems = [{"prompt": [rng.randrange(3, 380) for _ in range(rng.randint(3, 8))]} for _ in range(288)]
    targets = eng.generate([p["prompt"] for p in problems], SamplingParams(max_tokens=HORIZON, temperature=0.0),
                           policies.LLMOnly(), use_tqdm=False)
    for p, out in zip(problems, targets):
        p["target"] = out.token_ids
    task = Task(prompt=lambda p: p["prompt"], correct=lambda p, out: out.token_ids == p["target"])
    return eng, task, problems[:256], problems[256:]


def greedy_eval(eng, task, problems, router) -> dict:
    idx = list(range(len(problems)))
    rollouts, _ = run_rollouts(eng, router, problems, idx, [10_000 + i for i in idx], tau=0.0, tau_down=1.0,
                               temperature=0.0, task=task, max_tokens=HORIZON, latency_model=TOY_LATENCY, lam=LAM)
    return summarize_rollouts(rollouts)


TRAIN = dict(tau=0.0, tau_down=1.0, latency_model=TOY_LATENCY, prompts_per_batch=16, rollouts=8, lr=3e-3, lam=LAM,
             max_tokens=HORIZON, epochs_per_batch=4, progress=False)


def test_training_raises_reward(bump_task, tmp_path):
    """tau = 0 hands every SLM decision to the router; tau_down = 1 returns to the SLM after one LLM token."""
    eng, task, train, held_out = bump_task
    slm_only = eng.generate([p["prompt"] for p in held_out], SamplingParams(max_tokens=HORIZON, temperature=0.0),
                            policies.SLMOnly(), use_tqdm=False)
    assert np.mean([o.token_ids == p["target"] for o, p in zip(slm_only, held_out)]) < 0.2, "routing must matter"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        untrained = Router(32)
    before = greedy_eval(eng, task, held_out, untrained)
    assert before["accuracy"] == 1.0 and before["llm_share"] == 1.0  # the untrained router always switches
    router, history = train_router(eng, train, steps=25, seed=0, task=task, router=untrained, log_path=tmp_path / "log.jsonl",
                                   plot_path=tmp_path / "curves.png", **TRAIN)
    after = greedy_eval(eng, task, held_out, router)
    assert after["reward"] > before["reward"] + 0.08, (before, after)
    assert after["llm_share"] < 0.6 and after["accuracy"] >= 0.75
    assert len(history) == 25 and all(h["groups_kept"] > 0 for h in history)
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 25 and (tmp_path / "curves.png").stat().st_size
    assert router.meta["tau"] == 0.0 and router.meta["training"]["steps"] == 25


def without_wall_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "measured_s"} for h in history]


def test_resume_repeats_the_uninterrupted_run(bump_task, tmp_path):
    eng, task, train, _ = bump_task
    kw = dict(TRAIN, task=task, prompts_per_batch=4, rollouts=4, seed=5, checkpoint_every=2)
    full, full_history = train_router(eng, train, steps=4, checkpoint_dir=tmp_path / "a", **kw)
    train_router(eng, train, steps=2, checkpoint_dir=tmp_path / "b", **kw)
    resumed, resumed_history = train_router(eng, train, steps=4, checkpoint_dir=tmp_path / "b", resume=True,
                                            log_path=tmp_path / "b.jsonl", **kw)
    assert without_wall_time(resumed_history) == without_wall_time(full_history)
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    logged = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert without_wall_time(logged) == without_wall_time(full_history)
    with pytest.raises(ValueError, match="other settings"):
        train_router(eng, train, steps=6, checkpoint_dir=tmp_path / "b", resume=True, **{**kw, "lr": 1e-2})
    with pytest.raises(FileNotFoundError, match="no checkpoint.pt"):
        train_router(eng, train, steps=2, checkpoint_dir=tmp_path / "c", resume=True, **kw)


def test_commands_end_to_end(pair, tmp_path):
    import argparse

    from rstitch_engine.router.commands import add_commands

    parser = argparse.ArgumentParser(prog="rstitch")
    add_commands(parser.add_subparsers(dest="command", required=True))
    slm, llm = str(pair[0]), str(pair[1])
    latency = tmp_path / "latency.json"
    args = parser.parse_args(["calibrate", "--slm", slm, "--llm", llm, "--device", "cpu", "--out", str(latency),
                              "--chunk", "8", "--new-tokens", "2,8", "--kv-chunks", "0,1", "--decode-kv", "4,12",
                              "--batch-sizes", "1", "--repeats", "1", "--no-progress", "--kv-cache-gb", "0.02"])
    args.func(args)
    assert LatencyModel.load(latency).meta["grid"]["new_tokens"] == [2, 8]
    out = tmp_path / "run"
    args = parser.parse_args(["train-router", "--slm", slm, "--llm", llm, "--device", "cpu", "--latency", str(latency),
                              "--tau", str(TAU), "--steps", "2", "--prompts-per-batch", "2", "--rollouts", "2",
                              "--max-tokens", "6", "--synthetic", "6", "--eval", "2", "--eval-batch-size", "2",
                              "--checkpoint-every", "1", "--out", str(out), "--no-progress", "--kv-cache-gb", "0.02"])
    args.func(args)
    for name in ("router.safetensors", "router-init.safetensors", "log.jsonl", "curves.png", "eval.json", "eval.md",
                 "checkpoints/checkpoint.pt"):
        assert (out / name).is_file(), name
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert [r["policy"] for r in rows] == [f"rstitch:{TAU:g} = rstitch+ untrained", "rstitch+ trained"]
    assert Router.load(out / "router.safetensors").meta["tau"] == TAU
    warm = tmp_path / "warm"  # the supervised warm start before DAPO, evaluated as its own row
    args = parser.parse_args(["train-router", "--slm", slm, "--llm", llm, "--device", "cpu", "--latency", str(latency),
                              "--tau", str(TAU), "--steps", "1", "--prompts-per-batch", "2", "--rollouts", "2",
                              "--max-tokens", "6", "--synthetic", "6", "--eval", "2", "--eval-batch-size", "2",
                              "--warm-start", "3", "--warm-start-steps", "5", "--out", str(warm), "--no-progress",
                              "--kv-cache-gb", "0.02"])
    args.func(args)
    report = json.loads((warm / "warm_start.json").read_text())
    assert report["labels"]["problems"] >= 1 and len(report["curve"]) == 5
    rows = json.loads((warm / "eval.json").read_text())["rows"]
    assert [r["policy"] for r in rows] == [f"rstitch:{TAU:g}", "rstitch+ warm start", "rstitch+ trained"]
    assert "warm start" in Router.load(warm / "router-init.safetensors").meta["note"]


# ---- supervised warm start (router/warm_start.py) ------------------------------------------------------------
def _token_task():
    return Task(prompt=lambda p: p["prompt"], correct=lambda p, out: len(out.token_ids) > 0)


def test_warm_start_labels_are_where_the_llm_disagrees(close_pair):
    """By token, every labelled position's label equals what the LLM itself generates after that prefix (an
    independent greedy generate call per position); with the SLM as its own LLM, nothing is labelled switch."""
    from rstitch_engine.router.warm_start import label_positions

    problems = [{"prompt": [5, 17, 200]}, {"prompt": list(range(40, 47))}]
    eng = Engine(slm=close_pair[0], llm=close_pair[1], device="cpu", block_size=4, kv_cache_gb=0.01)
    labels = label_positions(eng, problems, [0, 1], task=_token_task(), tau=0.0, max_tokens=8, by="token")
    slm = eng.generate([p["prompt"] for p in problems], SamplingParams(max_tokens=8, temperature=0.0),
                       policies.SLMOnly(), use_tqdm=False)
    assert len(labels) == 16 and labels.summary()["problems"] == 2  # tau 0: every output position
    assert 0 < int(labels.switch.sum()) < len(labels), "the close pair agrees on some tokens, not all"
    assert torch.equal(labels.switch, labels.differs)
    for i in range(len(labels)):
        out = slm[int(labels.problem[i])]
        ids, pos = out.prompt_token_ids + out.token_ids, int(labels.position[i])
        llm_next = eng.generate([ids[:pos]], SamplingParams(max_tokens=1, temperature=0.0), policies.LLMOnly(),
                                use_tqdm=False)[0].token_ids[0]
        assert bool(labels.switch[i]) == (llm_next != ids[pos]), i
    same = Engine(slm=close_pair[0], llm=close_pair[0], device="cpu", block_size=4, kv_cache_gb=0.01)
    assert not label_positions(same, problems, [0, 1], task=_token_task(), tau=0.0, max_tokens=8).switch.any()
    with pytest.raises(ValueError, match="by must be one of outcome, token, got 'entropy'"):
        label_positions(eng, problems, [0], task=_token_task(), tau=0.0, max_tokens=8, by="entropy")


def test_warm_start_outcome_labels_switch_only_where_the_llm_rescues_the_answer(close_pair):
    """By outcome, a differing token is labelled switch only on problems the SLM gets wrong and R-Stitch gets
    right; the KV blocks of the extra R-Stitch run are returned."""
    from rstitch_engine.router.warm_start import label_positions

    problems = [{"prompt": [5, 17, 200]}, {"prompt": list(range(40, 47))}, {"prompt": [9, 300, 31, 8]}]
    eng = Engine(slm=close_pair[0], llm=close_pair[1], device="cpu", block_size=4, kv_cache_gb=0.01)
    free = eng.num_free_blocks
    by_token = label_positions(eng, problems, [0, 1, 2], task=_token_task(), tau=0.0, max_tokens=8, by="token")
    # the SLM's own trajectory uses no LLM token, R-Stitch at tau 0 does: "right" only with LLM help, except
    # on problem 1, which counts as wrong either way
    helped = Task(prompt=lambda p: p["prompt"],
                  correct=lambda p, out: out.stats["llm_tokens"] > 0 and p["prompt"][0] != 40)
    labels = label_positions(eng, problems, [0, 1, 2], task=helped, tau=0.0, max_tokens=8)
    assert torch.equal(labels.differs, by_token.differs) and torch.equal(labels.position, by_token.position)
    assert not labels.correct.any()
    assert torch.equal(labels.rescued, labels.problem != 1)
    assert torch.equal(labels.switch, labels.differs & (labels.problem != 1))
    assert labels.switch.any() and (labels.differs & ~labels.switch).any()
    assert labels.summary()["rescued_share"] == pytest.approx(float((labels.problem != 1).float().mean()))
    everything_right = label_positions(eng, problems, [0, 1, 2], task=_token_task(), tau=0.0, max_tokens=8)
    assert everything_right.correct.all() and not everything_right.switch.any()
    assert eng.num_free_blocks == free


def test_warm_start_fits_separable_labels_deterministically():
    from rstitch_engine.router.warm_start import Labels, warm_start

    g = torch.Generator().manual_seed(0)
    hidden, features = torch.randn(200, 32, generator=g), torch.randn(200, 4, generator=g)
    switch = features[:, 1] > 0.3  # a rule the router can learn from its features
    labels = Labels(hidden=hidden, features=features, switch=switch, differs=switch,
                    correct=torch.rand(200, generator=g) > 0.5, rescued=switch,
                    problem=torch.zeros(200, dtype=torch.int64), position=torch.arange(200))
    routers = []
    for _ in range(2):
        torch.manual_seed(1)
        router = Router(32, width=16)
        history = warm_start(router, labels, steps=150, lr=1e-2, seed=3)
        routers.append(router)
    assert history[-1]["loss"] < history[0]["loss"] and history[-1]["accuracy"] > 0.95
    for a, b in zip(routers[0].state_dict().values(), routers[1].state_dict().values()):
        assert torch.equal(a, b)
    ones = torch.ones(200, dtype=torch.bool)
    one_class = Labels(hidden=hidden, features=features, switch=ones, differs=ones, correct=labels.correct,
                       rescued=ones, problem=labels.problem, position=labels.position)
    router = Router(32, width=16)
    warm_start(router, one_class, steps=5, seed=3)  # nothing to balance: finite weights, a router that switches
    assert all(p.isfinite().all() for p in router.parameters()) and (router(hidden, features) > 0).all()
    with pytest.raises(ValueError, match="no labelled positions"):
        warm_start(Router(32), Labels(*(t[:0] for t in (hidden, features, switch, switch, switch, switch,
                                                          labels.problem, labels.position))))
