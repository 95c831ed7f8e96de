"""Switching statistics: run lengths, switches per 1k tokens and forwards per kind, in `rstitch bench` and
`rstitch eval` as in the library."""
import pytest

from rstitch_engine import Engine, SamplingParams, policies
from rstitch_engine.bench import run_bench
from rstitch_engine.outputs import RequestOutput
from rstitch_engine.switching import forward_kind, run_lengths, switching_stats


def test_run_lengths_and_kinds():
    assert run_lengths([0, 0, 1, 1, 1, 0, 1]) == {0: [2, 1], 1: [3, 1]}
    assert run_lengths([]) == {0: [], 1: []}
    assert [forward_kind(n) for n in (1, 2, 16, 17)] == ["decode", "small_extend", "small_extend", "long_extend"]


def test_stats_of_made_up_outputs():
    a = RequestOutput(0, None, [1], token_ids=list(range(10)), sources=[0, 0, 1, 1, 0, 0, 0, 1, 0, 0],
                      stats={"switches_to_llm": 2, "switches_to_slm": 2}, trace=[(0, 5, 0), (0, 1, 5), (1, 8, 0)])
    b = RequestOutput(1, None, [1], token_ids=list(range(10)), sources=[1] * 10,
                      stats={"switches_to_llm": 0, "switches_to_slm": 0}, trace=[(1, 20, 0), (1, 1, 20)])
    s = switching_stats([a, b])
    assert s["switches_per_1k"] == 1000 * 4 / 20
    assert s["llm_runs"] == {"runs": 3, "mean": 13 / 3, "p50": 2, "p90": 10, "max": 10}
    assert s["slm_runs"]["runs"] == 3 and s["slm_runs"]["mean"] == 7 / 3
    assert s["forwards"] == {"slm_small_extend": {"forwards": 1, "tokens": 5}, "slm_decode": {"forwards": 1, "tokens": 1},
                             "llm_small_extend": {"forwards": 1, "tokens": 8},
                             "llm_long_extend": {"forwards": 1, "tokens": 20}, "llm_decode": {"forwards": 1, "tokens": 1}}


def test_bench_and_generate_agree_on_switches(pair):
    eng = Engine(slm=pair[0], llm=pair[1], device="cpu", block_size=4, kv_cache_gb=0.01)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    prompts = [[5, 17, 200], list(range(40, 52))]
    policy = policies.RStitch(tau=0.72)
    [row] = [r for r in run_bench(eng, prompts, [policy], params) if r["policy"] == policy.name]
    outs = eng.generate(prompts, params, policy, use_tqdm=False)
    switches = sum(o.stats["switches_to_llm"] + o.stats["switches_to_slm"] for o in outs)
    assert switches > 0, "this tau must switch"
    assert row["switches_per_1k"] == pytest.approx(1000 * switches / 40)
    llm_runs = [n for o in outs for n in run_lengths(o.sources)[1]]
    assert row["mean_llm_run"] == pytest.approx(sum(llm_runs) / len(llm_runs))
    kinds = row["switching"]["forwards"]
    assert kinds["slm_decode"]["forwards"] > 0 and kinds["llm_small_extend"]["forwards"] > 0
    assert all(v["mean_ms"] >= 0 for v in kinds.values() if "mean_ms" in v)  # timed on the CPU
    assert sum(v["forwards"] for v in kinds.values()) == sum(len(o.trace) for o in outs)
