"""Hybrid decoding under load: the parking rule's share and its statistics, the step-cost model, the step
simulator (the real scheduler, priced steps) against a trace computed by hand, and bench/hybrid_load.py on
tiny models. Timings are never asserted; the arithmetic on them is, on made-up numbers."""
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from rstitch_engine import Engine, SamplingParams, policies
from rstitch_engine.bench import synthetic_prompts
from rstitch_engine.engine_config import LLM_BATCH_SHARE, LLM_MAX_WAIT
from rstitch_engine.engine.core import StepTiming
from rstitch_engine.evaluation.simulator import simulate
from rstitch_engine.evaluation.step_cost import ModelCost, StepCost
from rstitch_engine.protocol import LLM, SLM
from rstitch_engine.random_models import SHAPES, streamed_bytes

ROOT = Path(__file__).resolve().parents[1]


def cost_of(slm: ModelCost, llm: ModelCost, host_fixed=0.0, host_per_row=0.0) -> StepCost:
    """One set of coefficients, one regime."""
    return StepCost({SLM: [slm], LLM: [llm]}, (), host_fixed, host_per_row)


FLAT = cost_of(ModelCost(1.0, 0.0, 0.0, 0.0), ModelCost(10.0, 0.0, 0.0, 0.0))


def test_simulator_matches_a_trace_computed_by_hand():
    """A: sources [SLM, LLM, SLM], B: three SLM tokens, prompts of 2; an SLM step costs 1 ms, an LLM step 10.
    No parking: (0) SLM prefills both, 1 ms; (1) SLM: B's token, A's discarded (its position is the LLM's),
    1 ms; (2) SLM: B's last token; LLM: A's catch-up extend and its token, 11 ms, B done at 13; (3) SLM: A's
    catch-up and last token, 1 ms: A done at 14. Parking with share 1: step 2 holds A back (B could still
    join), so B finishes at 3, and A runs the LLM alone in step 3 (could-join == ready) and ends at 14."""
    patterns, prompts = [[0, 1, 0], [0, 0, 0]], [2, 2]
    plain = simulate(patterns, prompts, FLAT, batch=2)
    assert plain.latencies == pytest.approx([0.014, 0.013])
    assert (plain.tokens, plain.steps, plain.llm_steps, plain.llm_wait_steps) == (6, 4, 1, 0.0)
    assert plain.tok_s == pytest.approx(6 / 0.014)
    parked = simulate(patterns, prompts, FLAT, batch=2, llm_batch_share=1.0, llm_max_wait=16)
    assert parked.latencies == pytest.approx([0.014, 0.003])
    assert (parked.steps, parked.llm_steps, parked.llm_wait_steps) == (5, 1, 0.5)
    # a wait limit of 0 steps never parks
    assert simulate(patterns, prompts, FLAT, batch=2, llm_batch_share=1.0, llm_max_wait=0).latencies == \
        pytest.approx(plain.latencies)
    # LLM-only: three LLM steps for both rows together
    base = simulate(patterns, prompts, FLAT, batch=2, llm_only=True)
    assert (base.seconds, base.llm_steps, base.steps) == (pytest.approx(0.030), 3, 3)


def test_simulator_parking_waits_at_most_max_wait_and_fills_llm_steps():
    rng = np.random.default_rng(0)
    patterns = [list((rng.random(60) < 0.3).astype(int)) for _ in range(16)]
    prompts = [20] * 16
    cost = cost_of(ModelCost(8.0, 0.5, 0.3, 0.0), ModelCost(24.0, 2.0, 0.7, 0.0), 0.5, 0.01)
    plain = simulate(patterns, prompts, cost, batch=16)
    parked = simulate(patterns, prompts, cost, batch=16, llm_batch_share=0.75, llm_max_wait=3)
    assert parked.llm_steps < plain.llm_steps and parked.llm_rows_per_step > plain.llm_rows_per_step
    assert 0 < parked.llm_wait_steps and plain.llm_wait_steps == 0
    assert parked.tokens == plain.tokens == 16 * 60
    with pytest.raises(ValueError, match="one prompt length per pattern"):
        simulate(patterns, prompts[:3], cost, batch=4)


def test_step_cost_fit_recovers_known_costs():
    """Each model's three regimes (fewer than 4 tokens in the step, 4-9, 10 or more) and the host time, from
    timings made up from known coefficients."""
    truth = {SLM: [ModelCost(5.0, 0.4, 0.2, 0.001), ModelCost(7.0, 0.3, 0.1, 0.001), ModelCost(9.0, 0.1, 0.05, 0.002)],
             LLM: [ModelCost(20.0, 1.5, 0.6, 0.004), ModelCost(28.0, 0.5, 0.3, 0.002), ModelCost(35.0, 0.2, 0.1, 0.003)]}
    made_up = StepCost(truth, (4, 10), 0.3, 0.05)
    assert [made_up.regime_name(r) for r in range(3)] == ["1-3 tokens", "4-9 tokens", "10+ tokens"]
    assert [StepCost({}, (2, 17)).regime_name(r) for r in range(3)] == ["1 token", "2-16 tokens", "17+ tokens"]
    for bad in ((10, 4), (1, 4), (4, 4)):
        with pytest.raises(ValueError, match="bounds must be increasing token counts of 2 or more"):
            StepCost({}, bad)
    rng = np.random.default_rng(1)
    timings = []
    for step in range(200):
        shapes = []
        for m in (SLM, LLM):
            rows = int(rng.integers(1, 12))
            tokens = rows + int(rng.integers(0, 3)) * int(rng.integers(0, 8))
            shapes.append((m, rows, tokens, int(rng.integers(rows * 10, rows * 300))))
        wall = made_up.step_ms(shapes) / 1e3
        timings += [StepTiming(step, *shape, shape[1], made_up.model_ms(*shape) / 1e3, wall) for shape in shapes]
    cost = StepCost.fit(timings, bounds=(4, 10))
    for m in (SLM, LLM):
        for got, want in zip(cost.models[m], truth[m], strict=True):
            assert (got.fixed, got.per_row, got.per_token, got.per_context) == pytest.approx(
                (want.fixed, want.per_row, want.per_token, want.per_context), rel=1e-3)
    assert (cost.host_fixed, cost.host_per_row) == pytest.approx((0.3, 0.05), rel=1e-3)
    narrow_only = [t for t in timings if t.tokens < 10]
    with pytest.raises(ValueError, match="0 steps of slm/10\\+ tokens, need 8 or more"):
        StepCost.fit(narrow_only, bounds=(4, 10))


def test_step_cost_roofline_and_files(tmp_path):
    import torch

    cfg = SHAPES["7b"]
    weight = streamed_bytes(cfg, torch.bfloat16)
    cost = StepCost.roofline({LLM: (weight, cfg.kv_bytes_per_token(torch.bfloat16), weight / 2)}, bandwidth=4e12,
                             peak_flops=800e12, host_ms=0.05)
    [model] = cost.models[LLM]
    assert model.ms(1, 1, 0) == pytest.approx(1e3 * weight / 4e12)  # one decode: the weights once
    assert model.ms(1, 4096, 4096) == pytest.approx(1e3 * 4096 * weight / 800e12)  # a long prefill: compute
    assert cost.step_ms([(LLM, 1, 1, 0)]) == pytest.approx(model.ms(1, 1, 0) + 0.05)
    loaded = StepCost.load(cost.save(tmp_path / "c.json"))
    assert loaded.models == cost.models and loaded.host_fixed == cost.host_fixed
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json: not a step-cost file"):
        StepCost.load(tmp_path / "bad.json")
    data = cost.to_json()
    (tmp_path / "short.json").write_text(json.dumps({**data, "bounds": [3]}))
    with pytest.raises(ValueError, match="short.json: not a step-cost file .*2 regimes per model expected"):
        StepCost.load(tmp_path / "short.json")
    with pytest.raises(FileNotFoundError, match="no step-cost file at .*missing.json; make one with"):
        StepCost.load(tmp_path / "missing.json")


@pytest.fixture(scope="module")
def engine():
    return Engine(slm="random:tiny", llm="random:small", device="cpu", kv_cache_gb=0.02, max_model_len=256,
                  max_num_seqs=16)


def test_engine_parking_changes_timing_not_tokens(engine):
    prompts = synthetic_prompts(8, 10, engine.vocab_limit, seed=3)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    free = engine.num_free_blocks
    runs = {}
    for share in (0.0, 1.0):
        engine.set_parking(llm_batch_share=share, llm_max_wait=6)
        steps = engine.sched.llm_steps
        with engine.step_timings() as timings:
            outs = engine.generate(prompts, params, [policies.Forced(llm_share=0.3, mean_run=2, seed=s)
                                                     for s in range(8)], use_tqdm=False)
        runs[share] = (outs, engine.sched.llm_steps - steps, timings)
    engine.set_parking(llm_batch_share=LLM_BATCH_SHARE, llm_max_wait=LLM_MAX_WAIT)
    assert [o.token_ids for o in runs[0.0][0]] == [o.token_ids for o in runs[1.0][0]]
    assert [o.sources for o in runs[0.0][0]] == [o.sources for o in runs[1.0][0]]
    assert runs[1.0][1] < runs[0.0][1]  # fewer, fuller LLM steps
    waits = [o.stats["llm_wait_steps"] for o in runs[1.0][0]]
    assert sum(waits) > 0 and all(o.stats["llm_wait_steps"] == 0 for o in runs[0.0][0])
    # each LLM token waits at most llm_max_wait steps
    assert all(o.stats["llm_wait_steps"] <= 6 * o.stats["llm_tokens"] for o in runs[1.0][0])
    assert all(o.stats["llm_wait_s"] > 0 for o, w in zip(runs[1.0][0], waits) if w > 0)
    timings = runs[1.0][2]
    assert {t.model for t in timings} == {SLM, LLM} and all(t.seconds > 0 and t.step_seconds >= t.seconds
                                                            for t in timings)
    assert sum(t.rows for t in timings if t.model == LLM) >= runs[1.0][1]
    assert engine.num_free_blocks == free


def test_engine_parking_options_are_checked(engine):
    with pytest.raises(ValueError, match="llm_batch_share must be a number in \\[0, 1\\]"):
        engine.set_parking(llm_batch_share=1.5)
    with pytest.raises(ValueError, match="llm_max_wait must be an integer in"):
        Engine(slm="random:tiny", llm="random:small", device="cpu", llm_max_wait=-1)
    assert engine.config.llm_batch_share == LLM_BATCH_SHARE  # unchanged by the refused call


def _hybrid_load():
    spec = importlib.util.spec_from_file_location("hybrid_load", ROOT / "bench" / "hybrid_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hybrid_load_calibrate_and_sweep_dry(tmp_path, engine):
    hl = _hybrid_load()
    hl.main(["calibrate", "--out", str(tmp_path), "--dry", "--max-tokens", "16"])
    validation = json.loads((tmp_path / "validation.json").read_text())
    assert [r["batch"] for r in validation["rows"]] == [1, 4, 8, 16]
    for r in validation["rows"]:
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("engine_tok_s", "sim_tok_s", "engine_llm_only_tok_s",
                                                              "sim_llm_only_tok_s", "engine_ratio", "sim_ratio"))
        assert r["engine_llm_steps"] == r["sim_llm_steps"]  # the same rule on the same patterns
    outs = engine.generate(synthetic_prompts(5, 9, engine.vocab_limit), SamplingParams(max_tokens=20, ignore_eos=True),
                           policies.Forced(llm_share=0.3, mean_run=3), use_tqdm=False)
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"policy": "rstitch:0.02", "sources": o.sources,
                                           "prompt_tokens": len(o.prompt_token_ids)}) + "\n" for o in outs))
    hl.main(["sweep", "--out", str(tmp_path), "--patterns", str(records), "--step-cost",
             str(tmp_path / "step_cost.json"), "--dry"])
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert {r["device"] for r in sweep["rows"]} == {"this machine", "H200 roofline"}
    assert len(sweep["rows"]) == 2 * 5 * len(hl.RULES)
    assert all(r["speedup"] > 0 for r in sweep["rows"])
    assert (tmp_path / "sweep.png").stat().st_size > 0 and "| 16 |" in (tmp_path / "sweep.md").read_text()
