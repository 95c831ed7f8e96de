"""Benchmark support: random-weight models of real shapes, forced routing patterns, forced draft
acceptance, and `rstitch bench` (smoke-run on tiny shapes; the real numbers come from a GPU). Timed values
are wall-clock: tests assert their schema, counts and finiteness, never their size; the arithmetic on
them is tested on made-up timings."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rstitch_engine import Engine, SamplingParams, bench, policies
from rstitch_engine.bench import COLUMNS, run_bench, synthetic_prompts
from rstitch_engine.cli import main
from rstitch_engine.random_models import SHAPES, streamed_bytes


@pytest.fixture(scope="module")
def engine():
    return Engine(slm="random:tiny", llm="random:small", device="cpu", kv_cache_gb=0.01, max_model_len=512)


def _runs(mask):
    """(start, length) of each run of ones."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return list(zip(edges[::2], np.diff(edges)[::2]))


def test_shapes_match_the_published_rooflines():
    # docs/benchmarks.md, 'Roofline': 970 tok/s (1.5B) and 212 tok/s (7B) at 3.00 TB/s, batch 1, bf16
    assert 3.0e12 / streamed_bytes(SHAPES["1.5b"], torch.bfloat16) == pytest.approx(970, rel=0.01)
    assert 3.0e12 / streamed_bytes(SHAPES["7b"], torch.bfloat16) == pytest.approx(212, rel=0.01)


def test_forced_pattern_routes_exactly(engine):
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    out = engine.generate([[5, 6, 7]], params, policies.Forced(pattern="10-17,40-41,59"), use_tqdm=False)[0]
    want = [1 if 10 <= i <= 17 or 40 <= i <= 41 or i == 59 else 0 for i in range(60)]
    assert out.sources == want
    assert out.stats["switches_to_llm"] == 3 and out.stats["switches_to_slm"] == 2


def test_synthetic_forced_share_and_run_length():
    mask = policies.Forced(llm_share=0.1, mean_run=8, seed=3).llm_positions(200_000)
    assert mask.mean() == pytest.approx(0.1, abs=0.01)
    assert np.mean([size for _, size in _runs(mask)]) == pytest.approx(8, rel=0.1)
    assert not policies.Forced(llm_share=0.0).llm_positions(100).any()
    assert policies.Forced(llm_share=1.0).llm_positions(100).all()


@pytest.mark.parametrize("share,length", [(0.1, 256), (0.1, 64), (0.05, 256), (0.2, 300), (0.5, 256)])
def test_periodic_forced_share_is_exact(share, length):
    mask = policies.Forced.periodic(share, 8, length).llm_positions(length)
    assert mask.sum() == round(share * length)
    runs = _runs(mask)
    sizes = [size for _, size in runs]
    assert max(sizes) - min(sizes) <= 1 and abs(np.mean(sizes) - 8) <= 4
    assert runs[0][0] > 0 and runs[-1][0] + runs[-1][1] == length  # every run follows SLM tokens


@pytest.mark.parametrize("alpha", [0.3, 0.8])
def test_forced_acceptance_rate(engine, alpha):
    k = 4
    params = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
    outs = engine.generate([[i, i + 1] for i in range(3, 19)], params, policies.SpecDecode(k=k, accept_rate=alpha),
                           use_tqdm=False)
    rounds = sum(o.stats["verify_steps"] for o in outs)
    accepted = sum(o.stats["accepted"] for o in outs)
    # accepted drafts per full round: alpha + alpha^2 + ... + alpha^k (the last rounds may be shorter)
    assert accepted / rounds == pytest.approx(sum(alpha ** j for j in range(1, k + 1)), rel=0.15)


def test_run_bench_rows(engine):
    prompts = synthetic_prompts(3, 40, engine.vocab_limit)
    rows = run_bench(engine, prompts, [policies.SLMOnly(), policies.Forced(llm_share=0.2, mean_run=4)],
                     SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    assert [r["policy"] for r in rows] == ["llm", "slm", "forced:0.2:4"]
    assert rows[0]["tok_s_vs_llm"] == 1.0 and rows[0]["llm_share"] == 1.0 and rows[1]["llm_share"] == 0.0
    assert all(set(COLUMNS) <= set(r) for r in rows)
    assert all(r["tokens"] == 72 and r["requests"] == 3 and len(r["traces"]) == 3 for r in rows)
    # every timed run starts cold: its first forward prefills the whole prompt, whatever ran the prompts before
    assert all(trace[0][1:] == (40, 0) for r in rows for trace in r["traces"])
    assert all(math.isfinite(r[k]) for r in rows for k in ("tok_s", "tok_s_vs_llm", "mean_latency_s", "wall_s"))
    forced = rows[2]
    assert 0 < forced["llm_share"] < 1 and forced["switches_per_1k"] > 0
    # rows switch independently: one seed per request
    assert len({tuple(t[0] for t in trace) for trace in forced["traces"]}) > 1


def test_run_bench_ratio_on_made_up_timings(monkeypatch):
    """`tok_s_vs_llm` is each row's tok/s over the LLM-only row's, the LLM-only row timed first."""
    made_up = {"llm": 50.0, "slm": 400.0, "forced:0.2:4": 125.0}
    monkeypatch.setattr(bench, "time_policy", lambda engine, prompts, params, policy: {
        "policy": policy.name, "tok_s": made_up[policy.name]})
    both, slm_only = SimpleNamespace(paths={0: None, 1: None}), SimpleNamespace(paths={0: None})
    rows = run_bench(both, [[1]], [policies.SLMOnly(), policies.Forced(llm_share=0.2, mean_run=4)], None)
    assert [(r["policy"], r["tok_s_vs_llm"]) for r in rows] == [("llm", 1.0), ("slm", 8.0), ("forced:0.2:4", 2.5)]
    rows = run_bench(slm_only, [[1]], [policies.SLMOnly()], None)  # no LLM loaded: no baseline
    assert [(r["policy"], r["tok_s_vs_llm"]) for r in rows] == [("slm", None)]


def test_cli_bench_random_shapes(tmp_path, capsys):
    main(["bench", "--random-shapes", "tiny,small", "--policies", "slm,forced:0.1:8,spec:2@0.7", "--num-prompts",
          "2", "--max-tokens", "16", "--device", "cpu", "--out", str(tmp_path)])
    table = capsys.readouterr().out
    for name in ("llm", "slm", "forced:0.1:8", "spec:2@0.7"):
        assert f"| {name} |" in table
    for f in ("bench.json", "bench.md", "bench.png"):
        assert (tmp_path / f).stat().st_size > 0


def test_cli_bench_forced_and_acceptance_flags(tmp_path, capsys):
    main(["bench", "--random-shapes", "tiny,small", "--policies", "slm,spec:2", "--forced", "0.2:4", "--forced",
          "3-5,9", "--accept-rates", "0.5,0.9", "--num-prompts", "1", "--max-tokens", "12", "--device", "cpu"])
    table = capsys.readouterr().out
    for name in ("| llm |", "| slm |", "| forced:0.2:4 |", "| forced:pattern[3-5,9] |", "| spec:2@0.5 |", "| spec:2@0.9 |"):
        assert name in table
    assert "| spec:2 |" not in table


@pytest.mark.slow
def test_e2e_benchmark_script_runs_on_the_cpu(tmp_path):
    """bench/e2e.py (issue 5's one command) end to end on tiny shapes: every section, finite numbers."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "e2e.py"
    run = subprocess.run([sys.executable, str(script), "--shapes", "tiny,small", "--device", "cpu", "--quick",
                          "--max-tokens", "64", "--prompt-len", "16", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    [result] = tmp_path.glob("e2e-cpu-*.json")
    data = json.loads(result.read_text())
    assert {"batch1", "cost_model", "share_sweep", "spec_forced_acceptance", "batch_sweep", "long_context",
            "variants", "hf_baseline"} <= set(data)
    assert [r["llm_share"] for r in data["share_sweep"]] == [0.0, 6 / 64, 1.0]
    # wall-clock values (and a cost model fitted to a few timed points) are checked for being numbers only
    [cost] = data["cost_model"]
    assert all(math.isfinite(cost[k]) for k in ("measured_s", "predicted_s", "error_pct"))
    assert len(data["spec_forced_acceptance"]) == 3
    assert all(math.isfinite(r[k]) for r in data["spec_forced_acceptance"]
               for k in ("tok_s_vs_llm", "expected_speedup", "error_pct"))
    assert all(math.isfinite(r["tok_s"]) for section in ("batch1", "long_context", "variants", "hf_baseline")
               for r in data[section])
    assert {p.name.rsplit("-", 1)[-1] for p in tmp_path.glob("*.png")} == {"share.png", "batch.png"}


def test_switch_costs_script_dry_run(tmp_path):
    """bench/switch_costs.py (the switch-path measurement) end to end on tiny checkpoints: every column of
    every span, finite, each model's decode row its own unit."""
    import json
    import math
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "switch_costs.py"
    out = tmp_path / "costs"
    run = subprocess.run([sys.executable, str(script), "--dry", "--spans", "1,2,5", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert [(r["model"], r["span"]) for r in data["rows"]] == [(m, s) for m in ("slm", "llm") for s in (1, 2, 5)]
    assert all(math.isfinite(r[c]) for r in data["rows"] for c in r if c.endswith(("_ms", "_vs_decode")))
    assert all(r[c] == 1.0 for r in data["rows"] if r["span"] == 1 for c in r if c.endswith("_vs_decode"))
    assert "| llm | 5 |" in out.with_suffix(".md").read_text()


def _gpu_check():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_divergence_names_position_and_logit_gap(engine):
    """graph_equals_eager at batch 3: the first divergence and the gap between the two tokens' logits there,
    from a teacher-forced forward of the model that produced the token; the status rule on top of it."""
    gc = _gpu_check()
    prompts = synthetic_prompts(3, 12, engine.vocab_limit, seed=5)
    outs = engine.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
                           policies.Forced(pattern="3-6"), use_tqdm=False)
    eager, sources = [o.token_ids for o in outs], [o.sources for o in outs]
    assert gc.divergence(engine, prompts, eager, [list(t) for t in eager], sources) is None
    for position in (2, 4):  # a token of the SLM, then of the LLM
        other = [list(t) for t in eager]
        other[1][position] = (eager[1][position] + 1) % engine.vocab_limit
        other[1][position + 1:] = [0] * (len(eager[1]) - position - 1)
        where = gc.divergence(engine, prompts, eager, other, sources)
        assert (where["request"], where["position"]) == (1, position)
        assert where["model"] == ("llm" if position in range(3, 7) else "slm")
        assert where["eager_token"] == eager[1][position] and where["graph_token"] == other[1][position]
        assert where["logit_gap"] > 0 and where["gap_bf16_steps"] > 0  # fp32 greedy: the eager token is the argmax
    assert gc.equality_status(1, None) == gc.equality_status(3, None) == "PASS"
    assert gc.equality_status(1, {"gap_bf16_steps": 0.5}) == "FAIL"
    assert gc.equality_status(3, {"gap_bf16_steps": 0.5}) is None
    assert gc.equality_status(3, {"gap_bf16_steps": gc.GAP_BF16_STEPS + 1}) == "FAIL"
    assert gc.equality_status(3, {"reason": "one output is a prefix of the other"}) == "FAIL"


def test_gpu_check_dry_run(tmp_path):
    """bash bench/gpu_check.sh --dry: every stage of the GPU check on the CPU at tiny shapes, no failure,
    each check's fact recorded (the GPU-only ones as SKIP), built by the CMake fallback (pip left out) into
    a package the later stages import; what $OUT holds fits what the device returns (8 files at most,
    facts.jsonl among them, and printed in the output too)."""
    import json
    import os
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out, build = tmp_path / "check", tmp_path / "build"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "BUILD_DIR": str(build), "GPU_CHECK_BUILD": "cmake"}
    result = subprocess.run(["bash", str(root / "bench" / "gpu_check.sh"), "--dry"], capture_output=True, text=True,
                            timeout=2700, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    facts_text = (out / "facts.jsonl").read_text()
    facts = [json.loads(line) for line in facts_text.splitlines()]
    assert facts_text.splitlines()[-1] in result.stdout  # the facts come back in the output tail as well
    failed = [f for f in facts if f.get("status") in ("FAIL", "ERROR")]
    assert not failed, failed
    files = sorted(p.name for p in out.iterdir())
    assert files == ["facts.jsonl", "logs.tar.gz"] and all(p.is_file() for p in out.iterdir()), files
    with tarfile.open(out / "logs.tar.gz") as logs:
        names = {Path(n).name for n in logs.getnames()}
        build_log = logs.extractfile("./build.log").read().decode()
    assert {"build.log", "warm.log", "env.log", "smoke.log", "graphs.log", "tput.log", "micro.log",
            "nvidia-smi.txt"} <= names
    assert "package from " + str(build / "pythonpath") in build_log, build_log
    assert (build / "pythonpath" / "rstitch_engine" / "engine").is_symlink()
    exits = {f["stage"] for f in facts if f["name"] == "exit"}
    assert exits == {"build", "warm", "env", "smoke", "graphs", "tput", "micro"}
    names = {(f["stage"], f["name"]) for f in facts}
    for expected in [("warm", "warm_engine"), ("smoke", "stitch_step"), ("smoke", "paged_decode_attention"),
                     ("smoke", "linear"), ("smoke", "linear_split_k"), ("graphs", "graph_equals_eager"),
                     ("graphs", "no_sync_in_loop"), ("tput", "copy_bandwidth"), ("tput", "batch1"),
                     ("tput", "batch1_sampled"), ("tput", "profile_slm_17_tokens")]:
        assert expected in names, expected
    counters = {f["stage"]: f["status"] for f in facts if f["name"] == "arrival_counters_zero"}
    assert set(counters) == exits - {"build"} and counters["smoke"] == "PASS"  # the split-K case ran there
    policies = [f["policy"] for f in facts if f["name"] == "batch1"]
    assert policies[0] == "llm" and "slm" in policies and len(policies) == 4
    assert all(f["pct_roofline"] > 0 for f in facts if f["name"] == "batch1")
    costs = [f for f in facts if f["name"] == "cost_model"]  # both forced patterns priced by this run's timings
    assert len(costs) == 2 and all(f["predicted_s"] > 0 and f["measured_s"] > 0 for f in costs)


def test_copy_bandwidth_is_one_measure_for_every_report():
    """The one copy-bandwidth measure (% of roofline divides by it): bench/e2e.py, switch_costs.py,
    kernel_micro.py and gpu_check.py all call rstitch_engine.bench.copy_bandwidth, none measures its own."""
    import re
    from pathlib import Path

    from rstitch_engine.bench import copy_bandwidth

    assert math.isfinite(copy_bandwidth("cpu", 2**22)) and copy_bandwidth("cpu", 2**22) > 0
    root = Path(__file__).resolve().parents[1] / "bench"
    for script in ("e2e.py", "switch_costs.py", "kernel_micro.py", "gpu_check.py"):
        text = (root / script).read_text()
        assert "copy_bandwidth(" in text and not re.search(r"def copy_bandwidth", text), script
