"""`rstitch bench serve` (the load generator) and `rstitch serve` (the command) on a tiny random pair."""
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from rstitch_engine.cli import main
from rstitch_engine.engine.mp_executor import free_port
from rstitch_engine.serving.bench_serve import (RequestResult, check_loopback, parse_goodput, request_bodies,
                                                summarize)


def test_goodput_and_loopback_checks():
    assert parse_goodput("ttft:500,tpot:50") == {"ttft": 0.5, "tpot": 0.05}
    assert parse_goodput(None) == {}
    for bad, words in (("latency:5", "not ttft"), ("ttft:x", "milliseconds"), ("ttft:-1", "positive")):
        with pytest.raises(ValueError, match=words):
            parse_goodput(bad)
    assert check_loopback("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    with pytest.raises(ValueError, match="loopback"):
        check_loopback("http://10.0.0.5:8000")


def test_summary_follows_vllm_definitions():
    results = [RequestResult(ok=True, ttft=0.1, e2el=1.1, itl=[0.25] * 4, output_tokens=5,
                             rstitch={"slm_tokens": 3, "llm_tokens": 2, "switches_to_llm": 1, "switches_to_slm": 1}),
               RequestResult(ok=True, ttft=0.3, e2el=0.3, itl=[], output_tokens=1, rstitch={"slm_tokens": 1}),
               RequestResult(ok=False, error="HTTP 400: bad")]
    row = summarize(results, duration=2.0, goodput={"ttft": 0.2})
    assert (row["completed"], row["failed"], row["req_s"], row["output_tok_s"]) == (2, 1, 1.0, 3.0)
    assert row["tpot_ms_mean"] == pytest.approx(250.0)  # (1.1 - 0.1) / (5 - 1); one-token answers have none
    assert row["ttft_ms_p50"] == pytest.approx(100.0) and row["ttft_ms_p99"] == pytest.approx(300.0)
    assert row["goodput_req_s"] == 0.5
    assert row["llm_share"] == pytest.approx(2 / 6) and row["switches_per_1k"] == pytest.approx(1000 * 2 / 6)
    assert row["errors"] == ["HTTP 400: bad"]
    assert row["prefix_hit_rate_slm"] is None  # no prefix statistics in these answers
    cached = [RequestResult(ok=True, output_tokens=1, rstitch={"prefix_queries": 40, "prefix_hits_slm": 32,
                                                               "prefix_hits_llm": 0}),
              RequestResult(ok=True, output_tokens=1, rstitch={"prefix_queries": 60, "prefix_hits_slm": 48,
                                                               "prefix_hits_llm": 48})]
    row = summarize(cached, duration=1.0, goodput={})
    assert (row["prefix_hit_rate_slm"], row["prefix_hit_rate_llm"]) == (0.8, 0.48)


def test_request_bodies_assign_policies_round_robin():
    bodies = request_bodies(["a", "b", "c"], ["llm", "rstitch:0.05"], model=None, max_tokens=8, temperature=0.0,
                            seed=3)
    assert [b["rstitch"]["policy"] for b in bodies] == ["llm", "rstitch:0.05", "llm"]
    assert [b["seed"] for b in bodies] == [3, 4, 5] and all(b["stream"] for b in bodies)
    assert all(len(b["messages"]) == 1 for b in bodies)
    shared = request_bodies(["a", "b"], ["llm"], model=None, max_tokens=8, temperature=0.0, seed=None,
                            system_prompt_words=50)
    system = [b["messages"][0] for b in shared]
    assert system[0] == system[1] and system[0]["role"] == "system" and len(system[0]["content"].split()) == 50
    assert [b["messages"][1] for b in shared] == [b["messages"][0] for b in bodies[:2]]


def test_bench_serve_in_process_with_offline_comparison(pair, tmp_path):
    out = tmp_path / "results"
    main(["bench", "serve", "--slm", str(pair[0]), "--llm", str(pair[1]), "--dtype", "float32", "--device", "cpu",
          "--synthetic", "3", "--max-tokens", "6", "--concurrency", "1,2", "--policies", "llm,rstitch:0.5",
          "--goodput", "ttft:60000", "--out", str(out)])
    rows = json.loads((out / "bench_serve.json").read_text())["rows"]
    assert [(r["policy"], r["concurrency"]) for r in rows] == [("llm", 1), ("llm", 2), ("rstitch:0.5", 1),
                                                                ("rstitch:0.5", 2)]
    for r in rows:
        assert r["completed"] == 3 and r["failed"] == 0 and r["output_tok_s"] > 0 and r["goodput_req_s"] > 0
        assert r["ttft_ms_p50"] > 0 and 0 <= r["llm_share"] <= 1
    assert rows[0]["llm_share"] == 1 and rows[0]["server_vs_offline"] > 0 and "offline_tok_s" not in rows[1]
    assert "| policy |" in (out / "bench_serve.md").read_text()


def test_bench_serve_shared_prefix_passes_start_cold(pair, tmp_path):
    """With a shared system prompt the requests after a pass's first hit it, and every pass starts cold: the
    second pass (the same prompts, SLM-only again under another name) hits exactly as often as the first."""
    out = tmp_path / "results"
    main(["bench", "serve", "--slm", str(pair[0]), "--llm", str(pair[1]), "--dtype", "float32", "--device", "cpu",
          "--synthetic", "3", "--max-tokens", "4", "--policies", "slm,rstitch:2", "--system-prompt-words", "40",
          "--no-offline", "--out", str(out)])
    first, second = json.loads((out / "bench_serve.json").read_text())["rows"]
    assert 0 < first["prefix_hit_rate_slm"] < 1 and first["prefix_hit_rate_llm"] == 0
    assert second["prefix_hit_rate_slm"] == first["prefix_hit_rate_slm"]


def test_bench_serve_sends_the_api_key(pair):
    """run_pass with the server's key completes every request; without it every request fails with 401."""
    import asyncio

    from rstitch_engine import Engine, policies
    from rstitch_engine.serving.app import ServerConfig
    from rstitch_engine.serving.bench_serve import run_pass
    from rstitch_engine.serving.server import ServerThread

    engine = Engine(llm=pair[1], device="cpu", kv_cache_gb=0.01)
    bodies = request_bodies(["What is 2 + 3?", "Name a colour."], ["llm"], model=None, max_tokens=3,
                            temperature=0.0, seed=None)
    with ServerThread(engine, ServerConfig("m", policies.LLMOnly(), api_key="k-123")) as server:
        def run(key):
            return asyncio.run(run_pass(server.url, bodies, concurrency=2, request_rate=None, seed=0, timeout_s=60,
                                        api_key=key))[0]

        assert all(r.ok for r in run("k-123"))
        refused = run(None)
        assert not any(r.ok for r in refused) and all(r.error.startswith("HTTP 401") for r in refused)


def test_rstitch_serve_command_serves_and_stops_on_ctrl_c(pair):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rstitch_engine", "serve", "--slm", str(pair[0]), "--llm",
                             str(pair[1]), "--device", "cpu", "--port", str(port), "--served-model-name", "tiny",
                             "--log-level", "warning", "--kv-cache-gb", "0.02"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": [5, 6], "max_tokens": 4,
                                                      "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr


def _start_serve(pair, port: int, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "rstitch_engine", "serve", "--slm", str(pair[0]), "--llm",
                             str(pair[1]), "--device", "cpu", "--port", str(port), "--served-model-name", "tiny",
                             "--log-level", "warning", "--kv-cache-gb", "0.02", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the server did not start")


@pytest.mark.parametrize("shutdown_timeout, finishes", [("60", True), ("0.2", False)])
def test_sigterm_drains_then_exits_0(pair, shutdown_timeout, finishes):
    """SIGTERM: new requests get 503 with Retry-After, a running stream finishes (or, past
    --shutdown-timeout, is aborted and ends), and the process exits 0 with nothing left running."""
    import threading

    port = free_port()
    proc = _start_serve(pair, port, "--shutdown-timeout", shutdown_timeout)
    url, lines, started = f"http://127.0.0.1:{port}", [], threading.Event()

    def stream():
        body = {"model": "tiny", "prompt": [5, 6], "max_tokens": 800, "ignore_eos": True, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                started.set()
                if line:
                    lines.append(line)

    reader = threading.Thread(target=stream)
    try:
        reader.start()
        assert started.wait(60)
        proc.send_signal(signal.SIGTERM)
        refused = None
        for _ in range(100):  # the signal is handled between the server's polls
            refused = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": [5], "max_tokens": 2},
                                 timeout=10)
            if refused.status_code == 503:
                break
            time.sleep(0.05)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "shutting down" in refused.json()["error"]["message"]
        reader.join(120)
        assert not reader.is_alive()
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    if finishes:
        assert lines[-1] == "data: [DONE]"
        assert reasons == ["length"] and sum(len(c["choices"][0]["text"]) > 0 for c in chunks) > 0
    else:
        assert reasons != ["length"], "the stream must have been cut short by the shutdown timeout"
