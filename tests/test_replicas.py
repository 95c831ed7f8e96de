"""`rstitch serve --replicas 2` (serving/replicas.py): engine replicas on Ray Serve behind one ingress. One
application (2 replicas of a tiny pair, fp32 on the CPU), started as a user starts it, serves the module:
32 concurrent mixed-policy streams equal their offline runs and use both replicas, /metrics counts them all,
errors keep their OpenAI shape, the application's queue answers 503 when full, a replica whose process is
killed fails its requests and is replaced, and at the end Ctrl-C ends every process the command started
(the fixture's teardown). Each wait has a deadline, so a hang fails."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

pytest.importorskip("ray.serve")
pytestmark = pytest.mark.xdist_group("ray-replicas")  # one application, on one worker
import psutil  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from rstitch_engine import Engine, SamplingParams  # noqa: E402
from rstitch_engine.engine.mp_executor import free_port  # noqa: E402
from rstitch_engine.policies import parse_policy  # noqa: E402
from rstitch_engine.serving.app import ServerConfig  # noqa: E402
from rstitch_engine.serving.replicas import (EngineReplica, ReplicaApplication, ReplicaOptions,  # noqa: E402
                                             merged_exposition, replica_resources)

MODEL = "replicated"
# 2 replicas x 16 running + 8 queued: room for 40 requests at once (Ray Serve counts its queue approximately:
# a few more or fewer may be let in while replicas are being chosen, so the loads stay clear of the edge)
MAX_NUM_SEQS, MAX_WAITING = 16, 8
MAX_REQUEST_BYTES = 64 * 1024
POLICIES = ["llm", "slm", "rstitch:0.6", "spec:3"]
START_WITHIN_S = 300.0  # Ray, Serve and two engines on a busy 2-core machine
REQUEST_TIMEOUT_S = 120.0
REPLACED_WITHIN_S = 120.0
REPLICA_PROCESS = "ServeReplica:rstitch:EngineReplica"


@pytest.fixture(scope="module")
def replica_pair(tiny):
    """Shapes of their own: these checks do not reuse the other tests' pair."""
    return (tiny("qwen2", seed=11, init_std=0.3, hidden=48, heads=4, kv_heads=2, layers=2),
            tiny("qwen2", seed=12, init_std=0.3, hidden=64, heads=8, kv_heads=2, layers=3))


def engine_kwargs(pair) -> dict:
    return dict(slm=str(pair[0]), llm=str(pair[1]), device="cpu", dtype="float32", kv_cache_gb=0.02,
                max_model_len=256, max_num_seqs=MAX_NUM_SEQS)


class Served:
    """`rstitch serve --replicas 2 ...` in a process of its own, its stderr read in a thread."""

    def __init__(self, pair):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        options = [a for k, v in engine_kwargs(pair).items() for a in (f"--{k.replace('_', '-')}", str(v))]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rstitch_engine", "serve", "--replicas", "2", "--port", str(port),
             "--served-model-name", MODEL, "--max-waiting", str(MAX_WAITING), "--max-request-bytes",
             str(MAX_REQUEST_BYTES), *options],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "RAY_ADDRESS": ""})
        self.log: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(START_WITHIN_S):
            self.process.kill()
            raise AssertionError(f"not serving within {START_WITHIN_S:g} s: {''.join(self.log[-20:])}")
        self.started = psutil.Process(self.process.pid).children(recursive=True)  # Ray's processes

    def _read(self) -> None:
        for line in self.process.stderr:
            self.log.append(line)
            if "replicas ready" in line:
                self.ready.set()
        self.ready.set()  # it exited: the wait ends, the check above reports it

    def replica_processes(self) -> list:
        return [p for p in psutil.Process(self.process.pid).children(recursive=True)
                if REPLICA_PROCESS in " ".join(p.cmdline())]


@pytest.fixture(scope="module")
def served(replica_pair):
    """The application for the module's tests; at the end, Ctrl-C must stop it (exit 0) and every process
    it started."""
    server = Served(replica_pair)
    try:
        assert server.process.poll() is None, "".join(server.log)
        assert server.started, "Ray's processes run under the command"
        yield server
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(timeout=120) == 0, "".join(server.log[-20:])
        _, alive = psutil.wait_procs(server.started, timeout=60)
        assert not alive, f"left behind: {alive}"
    finally:
        if server.process.poll() is None:
            server.process.kill()


@pytest.fixture(scope="module")
def offline(replica_pair):
    return Engine(**engine_kwargs(replica_pair))


def request_body(i: int, max_tokens: int = 12, ignore_eos: bool = False) -> dict:
    """Request i of a mixed load: a policy, greedy or seeded sampling, its own prompt."""
    sampled = i % 2 == 1
    return {"model": MODEL, "prompt": [3 + i, 17, 5 + 2 * i, 40, 9], "max_tokens": max_tokens,
            "temperature": 0.8 if sampled else 0.0, "seed": 100 + i if sampled else None,
            "ignore_eos": ignore_eos, "rstitch": {"policy": POLICIES[i % len(POLICIES)]}}


def offline_texts(engine, bodies: list[dict]) -> list[str]:
    """The requests' texts from one offline generate (a request's output does not depend on its batch)."""
    params = [SamplingParams(max_tokens=b["max_tokens"], temperature=b["temperature"], seed=b["seed"],
                             ignore_eos=b["ignore_eos"]) for b in bodies]
    policies = [parse_policy(b["rstitch"]["policy"]) for b in bodies]
    return [out.text for out in engine.generate([b["prompt"] for b in bodies], params, policies, use_tqdm=False)]


async def stream(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One streamed completion: {"status", "text", "stats" (the last choice's rstitch), "error"}."""
    result = {"text": "", "stats": None, "error": None}
    async with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
        result["status"] = r.status_code
        if r.status_code != 200:
            result["error"] = json.loads(await r.aread())["error"]
            result["retry_after"] = r.headers.get("retry-after")
            return result
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                result["error"] = chunk["error"]
                continue
            for choice in chunk["choices"]:
                result["text"] += choice["text"]
                result["stats"] = choice.get("rstitch", result["stats"])
    return result


def streams(url: str, bodies: list[dict]) -> list[dict]:
    async def run():
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
            return await asyncio.gather(*(stream(client, url, b) for b in bodies))
    return asyncio.run(run())


def finished_requests(url: str) -> float:
    """The application's finished requests: /metrics summed over its replicas."""
    families = text_string_to_metric_families(httpx.get(url + "/metrics", timeout=REQUEST_TIMEOUT_S).text)
    return sum(s.value for f in families for s in f.samples if s.name == "rstitch:request_success_total")


def wait_for(check, within_s: float, what: str):
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"not within {within_s:g} s: {what}")


def test_32_mixed_streams_equal_their_offline_runs_on_both_replicas(served, offline):
    before = finished_requests(served.url)
    bodies = [request_body(i) for i in range(32)]
    results = streams(served.url, bodies)
    for body, result, text in zip(bodies, results, offline_texts(offline, bodies)):
        assert result["status"] == 200 and result["error"] is None, result
        assert result["text"] == text, body
    assert len({r["stats"]["replica"] for r in results}) == 2, "both replicas served"
    assert {r["stats"]["llm_share"] for r in results} >= {0.0, 1.0}
    wait_for(lambda: finished_requests(served.url) - before == 32, 10, "/metrics counting all 32")


def test_errors_keep_their_shape_through_the_ingress(served):
    url = served.url
    bad = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": [1, 2], "max_tokens": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
    unknown = httpx.post(url + "/v1/completions", json={"model": "other", "prompt": [1, 2]})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    huge = httpx.post(url + "/v1/completions", content=b"x" * (65 * 1024), headers={"content-type": "application/json"})
    assert huge.status_code == 413 and "request body" in huge.json()["error"]["message"]
    assert httpx.post(url + "/v1/completions", content=b"{nope").status_code == 400
    assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == MODEL
    assert httpx.get(url + "/health").status_code == 200
    whole = httpx.post(url + "/v1/completions", json=request_body(0), timeout=REQUEST_TIMEOUT_S).json()
    assert whole["rstitch"]["replica"] and whole["usage"]["completion_tokens"] == 12


def test_a_full_application_queue_answers_503(served):
    """64 long requests at once against room for 40 (running on both replicas, then --max-waiting queued):
    some get 503 with Retry-After in OpenAI's shape, the others finish."""
    results = streams(served.url, [request_body(i, max_tokens=64, ignore_eos=True) for i in range(64)])
    refused = [r for r in results if r["status"] == 503]
    assert 1 <= len(refused) <= 24, [r["status"] for r in results]
    assert all(r["error"]["type"] == "ServiceUnavailableError" and r["retry_after"] for r in refused)
    assert all(r["error"] is None and r["stats"]["replica"] for r in results if r["status"] == 200)


def test_a_killed_replica_fails_its_requests_and_is_replaced(served):
    """SIGKILL to one replica's process under load: its requests end with a 503 or an error event (no
    hang), the others finish; Ray Serve starts another and the application serves on both again."""
    bodies = [request_body(i, max_tokens=240, ignore_eos=True) for i in range(12)]
    [victim, _] = served.replica_processes()

    async def load_and_kill():
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
            running = [asyncio.create_task(stream(client, served.url, b)) for b in bodies]
            await asyncio.sleep(1.0)  # the requests are on both replicas
            victim.kill()
            return await asyncio.gather(*running)

    results = asyncio.run(load_and_kill())
    failed = [r for r in results if r["error"] is not None]
    assert all(r["status"] == 200 for r in results if r["error"] is None)
    assert all(r["error"]["type"] == "ServiceUnavailableError" and "replica" in r["error"]["message"]
               for r in failed), failed

    def replaced():
        live = [p for p in served.replica_processes() if p.pid != victim.pid]
        if len(live) != 2:
            return False
        outs = streams(served.url, [request_body(i) for i in range(8)])
        return all(r["status"] == 200 and r["error"] is None for r in outs) and \
            len({r["stats"]["replica"] for r in outs}) == 2

    wait_for(replaced, REPLACED_WITHIN_S, "two live replicas again, both serving")


def test_merged_metrics_label_every_series_with_its_replica():
    a = '# HELP x_total n\n# TYPE x_total counter\nx_total{model_name="m"} 3.0\n'
    b = '# HELP x_total n\n# TYPE x_total counter\nx_total{model_name="m"} 4.0\n# TYPE g gauge\ng 1.0\n'
    families = {f.name: f for f in text_string_to_metric_families(merged_exposition({"r1": a, "r2": b}).decode())}
    assert {(s.labels["replica"], s.value) for s in families["x"].samples if s.name == "x_total"} == {("r1", 3.0),
                                                                                                     ("r2", 4.0)}
    assert [(s.labels, s.value) for s in families["g"].samples] == [({"replica": "r2"}, 1.0)]


def test_a_replica_whose_step_loop_failed_is_unhealthy():
    """Ray Serve replaces a replica whose check_health raises: it raises once the engine's loop failed."""
    check_health = EngineReplica.func_or_class.check_health
    check_health(SimpleNamespace(replica="r1", online=SimpleNamespace(healthy=True, error=None)))
    failed = SimpleNamespace(replica="r1", online=SimpleNamespace(healthy=False, error=RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="replica r1: the engine's step loop failed: RuntimeError\\('boom'\\)"):
        check_health(failed)


def test_replica_resources_keep_a_replicas_ranks_together():
    assert replica_resources("cuda", 4) == {"placement_group_bundles": [{"CPU": 1, "GPU": 4}],
                                            "placement_group_strategy": "STRICT_PACK"}
    assert replica_resources("cpu", 2)["placement_group_bundles"] == [{"CPU": 2}]


def test_bad_options_fail_before_ray_starts(replica_pair):
    """Checked when the application is built, before `with` starts Ray."""
    server = ServerConfig(MODEL, None)
    with pytest.raises(ValueError, match="--replicas"):
        ReplicaApplication(engine_kwargs(replica_pair), server, ReplicaOptions(0))
    with pytest.raises(ValueError, match="max_num_seqs"):
        ReplicaApplication({**engine_kwargs(replica_pair), "max_num_seqs": 0}, server, ReplicaOptions(2))
    r = subprocess.run([sys.executable, "-m", "rstitch_engine", "serve", "--ray-address", "auto", "--slm", "x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--replicas" in r.stderr
