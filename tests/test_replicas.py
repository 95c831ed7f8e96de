"""`rstitch serve --replicas N` (serving/replicas.py): engine replicas on Ray Serve behind one ingress. One
application (2 replicas of a tiny pair, fp32 on the CPU) serves the module: 32 concurrent mixed-policy
streams equal their offline runs and use both replicas, /metrics counts them all, errors keep their OpenAI
shape, the application's queue answers 503 when full, a killed replica fails its requests and is replaced;
every process Ray started ends with the application. Each wait has a deadline, so a hang fails."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("ray.serve")
import psutil  # noqa: E402
import ray  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from rstitch_engine import Engine, SamplingParams  # noqa: E402
from rstitch_engine.engine.mp_executor import free_port  # noqa: E402
from rstitch_engine.policies import parse_policy  # noqa: E402
from rstitch_engine.serving.app import ServerConfig  # noqa: E402
from rstitch_engine.serving.replicas import (ReplicaApplication, ReplicaOptions, merged_exposition,  # noqa: E402
                                             replica_resources)

MODEL = "replicated"
# 2 replicas x 8 running + 32 queued: room for 48 requests at once (Ray Serve counts its queue approximately:
# a few more or fewer may be let in while replicas are being chosen, so the loads stay clear of the edge)
MAX_NUM_SEQS, MAX_WAITING = 8, 32
POLICIES = ["llm", "slm", "rstitch:0.6", "spec:3"]
REQUEST_TIMEOUT_S = 120.0
REPLACED_WITHIN_S = 120.0


@pytest.fixture(scope="module")
def replica_pair(tiny):
    """Shapes of their own: these checks do not reuse the other tests' pair."""
    return (tiny("qwen2", seed=11, init_std=0.3, hidden=48, heads=4, kv_heads=2, layers=2),
            tiny("qwen2", seed=12, init_std=0.3, hidden=64, heads=8, kv_heads=2, layers=3))


def engine_kwargs(pair) -> dict:
    return dict(slm=str(pair[0]), llm=str(pair[1]), device="cpu", dtype="float32", kv_cache_gb=0.02,
                max_model_len=256, max_num_seqs=MAX_NUM_SEQS)


@pytest.fixture(scope="module")
def app(replica_pair):
    server = ServerConfig(MODEL, None, max_request_bytes=64 * 1024)
    options = ReplicaOptions(2, port=free_port(), max_waiting=MAX_WAITING, max_request_bytes=64 * 1024,
                             start_timeout_s=300, ray_init={"num_cpus": 4})
    application = ReplicaApplication(engine_kwargs(replica_pair), server, options)
    with application:
        session = ray._private.worker._global_node.get_session_dir_path()
        yield application
    assert not ray.is_initialized()
    left = [p for p in psutil.process_iter(["cmdline"]) if session in " ".join(p.info["cmdline"] or [])]
    assert not left, f"processes of the application outlived it: {left}"


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


def test_32_mixed_streams_equal_their_offline_runs_on_both_replicas(app, offline):
    before = finished_requests(app.url)
    bodies = [request_body(i) for i in range(32)]
    results = streams(app.url, bodies)
    for body, result, text in zip(bodies, results, offline_texts(offline, bodies)):
        assert result["status"] == 200 and result["error"] is None, result
        assert result["text"] == text, body
    assert len({r["stats"]["replica"] for r in results}) == 2, "both replicas served"
    assert {r["stats"]["llm_share"] for r in results} >= {0.0, 1.0}
    wait_for(lambda: finished_requests(app.url) - before == 32, 10 * 0.5 + 5, "/metrics counting all 32")


def test_errors_keep_their_shape_through_the_ingress(app):
    url = app.url
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


def test_a_full_application_queue_answers_503(app, offline):
    """80 long requests at once against room for 48 (running on both replicas, then --max-waiting queued):
    some get 503 with Retry-After in OpenAI's shape; every admitted one equals its offline run."""
    bodies = [request_body(i, max_tokens=96, ignore_eos=True) for i in range(80)]
    results = streams(app.url, bodies)
    refused = [r for r in results if r["status"] == 503]
    assert 1 <= len(refused) <= 32, [r["status"] for r in results]
    assert all(r["error"]["type"] == "ServiceUnavailableError" and r["retry_after"] for r in refused)
    admitted = [(b, r) for b, r in zip(bodies, results) if r["status"] == 200]
    for (body, result), text in zip(admitted, offline_texts(offline, [b for b, _ in admitted])):
        assert result["error"] is None and result["text"] == text, body


def test_a_killed_replica_fails_its_requests_and_is_replaced(app):
    bodies = [request_body(i, max_tokens=240, ignore_eos=True) for i in range(12)]

    async def load_and_kill():
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
            running = [asyncio.create_task(stream(client, app.url, b)) for b in bodies]
            await asyncio.sleep(1.0)  # the requests are on both replicas
            victim = app.replica_actors()[0]
            ray.kill(victim, no_restart=True)
            return victim, await asyncio.gather(*running)

    victim, results = asyncio.run(load_and_kill())
    failed = [r for r in results if r["error"] is not None]
    assert all(r["status"] == 200 for r in results if r["error"] is None)
    assert all(r["error"]["type"] == "ServiceUnavailableError" and "replica" in r["error"]["message"]
               for r in failed), failed
    killed = victim._actor_id

    def replaced():
        actors = app.replica_actors()
        if len(actors) != 2 or killed in {a._actor_id for a in actors}:
            return False
        r = httpx.post(app.url + "/v1/completions", json=request_body(1), timeout=REQUEST_TIMEOUT_S)
        return r.status_code == 200

    wait_for(replaced, REPLACED_WITHIN_S, "two live replicas again, serving")


def test_merged_metrics_label_every_series_with_its_replica():
    a = '# HELP x_total n\n# TYPE x_total counter\nx_total{model_name="m"} 3.0\n'
    b = '# HELP x_total n\n# TYPE x_total counter\nx_total{model_name="m"} 4.0\n# TYPE g gauge\ng 1.0\n'
    families = {f.name: f for f in text_string_to_metric_families(merged_exposition({"r1": a, "r2": b}).decode())}
    assert {(s.labels["replica"], s.value) for s in families["x"].samples if s.name == "x_total"} == {("r1", 3.0),
                                                                                                     ("r2", 4.0)}
    assert [(s.labels, s.value) for s in families["g"].samples] == [({"replica": "r2"}, 1.0)]


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


def test_ctrl_c_stops_the_cli_application_and_every_process_it_started(replica_pair):
    port = free_port()
    command = [sys.executable, "-m", "rstitch_engine", "serve", "--replicas", "1", "--port", str(port),
               *[a for k, v in engine_kwargs(replica_pair).items() for a in (f"--{k.replace('_', '-')}", str(v))]]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RAY_ADDRESS": ""})
    try:
        def up():
            if server.poll() is not None:
                raise AssertionError(f"rstitch serve exited: {server.stderr.read()}")
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 300, "the CLI's application serving")
        started = psutil.Process(server.pid).children(recursive=True)
        assert started, "Ray's processes run under the CLI"
        server.send_signal(signal.SIGINT)
        server.wait(timeout=120)
        gone, alive = psutil.wait_procs(started, timeout=60)
        assert not alive, f"left behind: {alive}"
    finally:
        if server.poll() is None:
            server.kill()
